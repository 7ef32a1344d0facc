"""Hub ids (`org/name`): downloaded with huggingface_hub, then read as a checkpoint folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgepack.errors import EdgepackError
from edgepack.intake.common import first_line

# What a Hub download fetches: what `load_folder` reads, and never pickled `.bin` weights.
HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import, which may precede the setting.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise EdgepackError(
            f"could not download {repo_id} from the Hugging Face Hub ({first_line(exc)})",
            "check the network, or pass a local folder or .gguf with --model",
        ) from None
