// Plain JVM library (no Android API): bundle reading and checking, chat format, stop/think handling, UTF-8-safe
// streaming. edgepack's CI compiles the same sources with javac against Debian's gson 2.10 and JUnit 5.9.2 jars
// (bundlekit/test.sh); the versions below are those.
plugins {
    `java-library`
}

java {
    sourceCompatibility = JavaVersion.VERSION_11
    targetCompatibility = JavaVersion.VERSION_11
}

tasks.withType<JavaCompile>().configureEach {
    options.release.set(11)
    options.encoding = "UTF-8"
}

dependencies {
    api("com.google.code.gson:gson:2.10")
    testImplementation(platform("org.junit:junit-bom:5.9.2"))
    testImplementation("org.junit.jupiter:junit-jupiter")
    testRuntimeOnly("org.junit.platform:junit-platform-launcher")
}

tasks.test {
    useJUnitPlatform()
    // Golden vectors written by edgepack's `python -m pytest tests/test_demo_vectors.py` (repository root).
    systemProperty("edgepack.vectors", rootDir.resolve("../build/app-vectors").canonicalPath)
}
