"""LiteRT's NPU flavours (`--backend litert/tensor`, `litert/qualcomm`, `litert/mediatek`): ahead-of-time compilation
of the `.tflite` for the SoC's NPU with the vendor SDK packages (`ai-edge-litert-sdk-*`). Checked before anything
is loaded; see NOTES.md ("LiteRT", NPU) for what each SDK needs."""

from __future__ import annotations

import importlib.util
from typing import Any

from edgepack.errors import EdgepackError

# delegate -> (pip package of the vendor SDK, its Python module)
SDK_PACKAGES = {
    "tensor": ("ai-edge-litert-sdk-google-tensor", "ai_edge_litert_sdk_google_tensor"),
    "qualcomm": ("ai-edge-litert-sdk-qualcomm", "ai_edge_litert_sdk_qualcomm"),
    "mediatek": ("ai-edge-litert-sdk-mediatek", "ai_edge_litert_sdk_mediatek"),
}


def check_npu(delegate: str, target: Any) -> None:
    """Refuse before any long work: the SDK package must be installed and able to compile here."""
    package, module = SDK_PACKAGES[delegate]
    if importlib.util.find_spec(module) is None:
        raise EdgepackError(f"litert/{delegate} needs the {package} package to compile for the NPU ahead of time",
                            f"pip install {package}, or use --backend litert (CPU/GPU)")
    raise EdgepackError(f"litert/{delegate}: ahead-of-time NPU compilation is not wired into edgepack yet",
                        "use --backend litert (CPU/GPU); NOTES.md, LiteRT, says what the SDK needs")
