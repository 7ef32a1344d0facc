"""`edgepack --help` and `edgepack targets` answer without importing torch (seconds of start-up on 2 cores)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from click.testing import CliRunner
from edgepack.cli import main
result = CliRunner().invoke(main, sys.argv[1:])
assert result.exit_code == 0, result.output
heavy = sorted(m for m in ("torch", "executorch", "onnxruntime", "transformers") if m in sys.modules)
print(",".join(heavy) or "none")
"""


@pytest.mark.parametrize("args", [["--help"], ["targets"], ["targets", "--json"], ["export", "--help"]])
def test_cli_starts_without_heavy_imports(args):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "none"


def test_running_an_onnx_bundle_does_not_import_torch(tmp_path):
    """`edgepack run` on an ONNX bundle needs ONNX Runtime, the tokenizer and the template: torch alone would add
    ~200 MB resident and a second of start-up to every run (only ExecuTorch's bindings link libtorch)."""
    from tests.conftest import tiny_onnx_bundle

    bundle = tiny_onnx_bundle(tmp_path)
    out = subprocess.run([sys.executable, "-c", PROBE, "run", str(bundle), "Name the capital city of France.",
                          "--max-new-tokens", "4"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "onnxruntime"
