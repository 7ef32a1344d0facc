"""The reference "backend": the project's own torch model, weights in safetensors.

Used for host checks (e.g. of a bundle whose real backend needs another OS) and as the baseline every
other backend is compared against, so it takes unquantized presets only (fp32, fp16).
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save_file

from edgepack.exporters import ExportRequest, register_exporter

WEIGHTS_FILE = "model.safetensors"


@register_exporter("reference")
def export_reference(request: ExportRequest) -> dict[str, Any]:
    model = request.model
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        state.pop("lm_head.weight")
    request.step("write safetensors")
    save_file(state, str(request.writer.path(WEIGHTS_FILE)))
    return {"name": "reference", "delegate": None, "program": WEIGHTS_FILE, "max_prefill": request.max_prefill}

