#!/usr/bin/env bash
# Build bundlekit (the demo apps' bundle handling, plain Java) and run its JUnit 5 tests with this machine's
# JDK and Debian's jars (no Maven repository is reachable here), against the bundles and golden vectors that
# tests/test_demo_vectors.py writes to build/app-vectors. Fails when a test fails or the vectors are missing.
#   python -m pytest -q tests/test_demo_vectors.py && android_demo/bundlekit/test.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
vectors="${EDGEPACK_VECTORS:-$root/build/app-vectors}"
jars=/usr/share/java
gson="$jars/gson.jar"
junit="$jars/junit-platform-console-standalone.jar"  # the launcher with JUnit Jupiter's API and engine inside

if ! command -v javac >/dev/null || [ ! -f "$gson" ] || [ ! -f "$junit" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bundlekit: needs javac, $gson and $junit: sudo apt-get install -y default-jdk-headless libgoogle-gson-java junit5" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jdk-headless libgoogle-gson-java junit5 >/dev/null
fi
if [ ! -f "$vectors/vectors.json" ]; then
    echo "bundlekit: no golden vectors at $vectors: run \`python -m pytest -q tests/test_demo_vectors.py\` first" >&2
    exit 1
fi

out="$here/build/javac"
rm -rf "$out"
mkdir -p "$out/main" "$out/test"
# Java 11 bytecode and API: what the Android module compiles to as well.
javac --release 11 -Xlint:all -Werror -encoding UTF-8 -d "$out/main" -cp "$gson" \
    $(find "$here/src/main/java" -name '*.java' | sort)
javac --release 11 -Xlint:all -encoding UTF-8 -d "$out/test" -cp "$out/main:$gson:$junit" \
    $(find "$here/src/test/java" -name '*.java' | sort)
status=0
java -Dedgepack.vectors="$vectors" -jar "$junit" \
    --class-path "$out/main:$out/test:$gson" --scan-class-path --fail-if-no-tests \
    --disable-banner --details=summary --details-theme=ascii | tee "$out/junit.log" || status=$?
# The launcher's counts as one plain closing line.
passed=$(sed -n 's/^\[ *\([0-9]*\) tests successful *\]$/\1/p' "$out/junit.log")
failed=$(sed -n 's/^\[ *\([0-9]*\) tests failed *\]$/\1/p' "$out/junit.log")
echo "bundlekit: ${passed:-0} passed, ${failed:-0} failed"
exit "$status"
