"""LiteRT's NPU flavours (`--backend litert/tensor`, `litert/qualcomm`, `litert/mediatek`): ahead-of-time compilation
of the `.tflite` for the SoC's NPU needs the vendor's compiler, which LiteRT's SDK packages (`ai-edge-litert-sdk-*`
2.3.0, source distributions) download from the vendor while pip builds them. Checked before anything is loaded.

Measured here (NOTES.md, "LiteRT"): the Google Tensor package fetches Google Tensor ML SDK 6.1.0
(`litert_plugin_compiler.tar.gz`) from redirector.gvt1.com and the Qualcomm one QAIRT 2.50.0.260828 from
softwarecenter.qualcomm.com; with no route to either, neither installs, so nothing can be compiled here. With the
package installed the exporter still refuses: compiling through it has never run, and an untested path is not
shipped as working.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from edgepack.errors import EdgepackError

# delegate -> (pip package of the vendor SDK, its Python module, what its build downloads)
SDK_PACKAGES = {
    "tensor": ("ai-edge-litert-sdk-google-tensor", "ai_edge_litert_sdk_google_tensor",
               "Google Tensor ML SDK 6.1.0 from redirector.gvt1.com"),
    "qualcomm": ("ai-edge-litert-sdk-qualcomm", "ai_edge_litert_sdk_qualcomm",
                 "QAIRT 2.50.0.260828 from softwarecenter.qualcomm.com"),
    "mediatek": ("ai-edge-litert-sdk-mediatek", "ai_edge_litert_sdk_mediatek", "MediaTek NeuroPilot's compiler"),
}


def check_npu(delegate: str, target: Any) -> None:
    """Refuse before any long work, naming what the NPU build needs."""
    package, module, download = SDK_PACKAGES[delegate]
    if importlib.util.find_spec(module) is None:
        raise EdgepackError(
            f"litert/{delegate} compiles for the NPU ahead of time with {package}, which is not installed "
            f"(pip builds it by downloading {download})",
            f"pip install {package}==2.3.0 on a machine that reaches that host, or use --backend litert (CPU/GPU)")
    raise EdgepackError(f"litert/{delegate}: edgepack has not compiled through {package} yet (untested here)",
                        "use --backend litert (CPU/GPU); NOTES.md, LiteRT, has the NPU findings")
