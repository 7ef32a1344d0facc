"""The export pipeline: load -> quantize -> lower(target) -> bundle. Each step is one call below.

Everything that can be checked cheaply (target, preset, backend, context length) is checked before the
model is loaded, so bad input fails in milliseconds, not after minutes of lowering.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import UsageError
from edgepack.presets import QuantPreset, check_carried, get_preset
from edgepack.progress import SILENT, Steps
from edgepack.targets import Target, get_target

DEFAULT_PREFILL_CHUNK = 128  # tokens per prefill call; bounds the program's activation memory
THINK_TAGS = {"start": "<think>", "end": "</think>"}


@dataclass(frozen=True)
class ExportPlan:
    """What will be built, decided up front from the command line and the target."""

    source: str | None
    target: Target
    preset: QuantPreset
    backend: str
    delegate: str | None
    max_context: int
    output: Path
    verify: bool = True  # the quality gate (sdk/verify.py) on the staged bundle
    keep_failed: bool = False  # keep a bundle that fails the gate, marked failed in its manifest
    fit: Any = None  # edgepack.fit.FitReport: memory and size against the target, when the config was readable
    force: bool = False  # replace an existing bundle at `output` (never any other folder)
    context_from: str = "--max-context"  # where max_context came from: the option, the target or the model

    @property
    def backend_label(self) -> str:
        """"name/delegate", as targets and thresholds spell a backend."""
        return "/".join(filter(None, (self.backend, self.delegate)))

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.source or "default (SmolLM2-135M-Instruct)",
            "target": self.target.name,
            "quantization": self.preset.name + (f" ({self.preset.activation_ranges} activation ranges)"
                                                if self.preset.activation_ranges > 1 else ""),
            "backend": self.backend_label,
            "max_context": f"{self.max_context} ({self.context_from})",
            "output": str(self.output),
        }


def plan_export(
    source: str | None,
    target_name: str,
    quant: str | None = None,
    max_context: int | None = None,
    output: str | Path | None = None,
    backend: str | None = None,
    group_size: int | None = None,
    verify: bool = True,
    keep_failed: bool = False,
    force: bool = False,
    *,
    activation_ranges: int | None = None,
) -> ExportPlan:
    from edgepack.exporters import known_exporters, takes_activation_ranges

    target = get_target(target_name)
    preset = get_preset(quant or target.default_quant).with_group_size(group_size)
    preset = preset.with_activation_ranges(activation_ranges)
    if backend:
        name, _, delegate = backend.partition("/")
        if name not in known_exporters():
            raise UsageError(f"unknown backend {backend!r}", f"choose one of: {', '.join(known_exporters())}")
        chosen = (name, delegate or _default_delegate(target, name))
    else:
        chosen = target.backend_choice(known_exporters())
    if preset.activation_ranges > 1 and not takes_activation_ranges(chosen[0]):
        takers = [name for name in known_exporters() if takes_activation_ranges(name)]
        raise UsageError(f"--activation-ranges applies where int8 activations are rounded per token "
                         f"({', '.join(takers)}), not to {'/'.join(filter(None, chosen))}",
                         "leave --activation-ranges out (this backend rounds activations its own way)")
    if chosen[0] == "reference" and preset.quantized:
        raise UsageError("the reference backend runs unquantized weights only", "use --quant fp32 or fp16")
    context = max_context or target.default_context
    if context < 16 or context > 131072:
        raise UsageError(f"--max-context {context} is out of range", "use a value between 16 and 131072")
    from edgepack.exporters import preflight

    preflight(chosen[0], target, chosen[1], preset)  # e.g. the ONNX/QNN runtime installed, the SoC known
    out = Path(output) if output else Path("bundles") / f"{_slug(source)}-{target.name}-{preset.name}"
    from edgepack.bundle import check_destination

    check_destination(out, force)  # no data loss, writable: before any model is loaded
    from edgepack.fit import peek_config

    config = peek_config(source)  # config.json or the GGUF header: no weights read
    if config is not None:
        check_carried(preset, config.architecture)  # e.g. -q ternary for a Llama: refused before loading
    context_from = "--max-context" if max_context else f"{target.name}'s default"
    if not max_context and config is not None and config.max_position_embeddings < context:
        context, context_from = config.max_position_embeddings, "the model's maximum"
    from edgepack.exporters import context_limit

    label = "/".join(filter(None, chosen))
    limit = context_limit(chosen[0], target, chosen[1])
    if limit is not None and context > limit:
        if max_context:
            raise UsageError(f"--max-context {max_context} exceeds what {label} builds for {target.name} ({limit})",
                             f"use --max-context {limit} or less")
        context, context_from = limit, f"the {label} limit"
    fit = _fit_check(config, target, preset, context, label, source) if config else None
    return ExportPlan(source, target, preset, chosen[0], chosen[1], context, out, verify, keep_failed, fit=fit,
                      force=force, context_from=context_from)


def _fit_check(config: Any, target: Target, preset: QuantPreset, context: int, backend: str,
               source: str | None) -> Any:
    """Refuse, before any long work, a model that would not fit the target's memory or bundle budget
    (`backend`: "name/delegate"), or whose export this machine cannot hold."""
    from edgepack.fit import check_export_memory, check_fit, gguf_wide_weights

    report = check_fit(config, preset, target, context, backend, wide=gguf_wide_weights(source))
    report.raise_if_not_fits()
    check_export_memory(config)
    return report


def _default_delegate(target: Target, backend: str) -> str | None:
    for entry in target.backends:
        name, _, delegate = entry.partition("/")
        if name == backend:
            return delegate or None
    return "xnnpack" if backend == "executorch" else None


def _slug(source: str | None) -> str:
    if not source:
        return "smollm2-135m-instruct"
    name = Path(source.rstrip("/")).name
    return name.removesuffix(".gguf").lower().replace(".", "-").replace("_", "-")


def run_export(plan: ExportPlan, step: Steps = SILENT, student: Any = None, built: "BuiltModel | None" = None,
               reference: Any = None) -> dict[str, Any]:
    """Build the bundle the plan describes; returns its manifest. A release matrix (sdk/matrix.py) passes what
    its cells share: the loaded `student`, the model `built` once for cells of the same recipe, and the fp32
    `reference`'s recorded answers for the gate (verify.RecordedReference)."""
    from edgepack.bundle import write_bundle
    from edgepack.exporters import ExportRequest, get_exporter
    from edgepack.intake import load_student
    from edgepack.verify import VerificationFailed, gate_export

    started = time.perf_counter()
    exporter = get_exporter(plan.backend)
    if student is None:
        step("load model")
        student = load_student(plan.source)
    plan = check_loaded(plan, student)
    parked = tempfile.TemporaryDirectory(prefix="edgepack-quantized-")
    if built is None:
        built = build_for_plan(plan, student, step, Path(parked.name) if plan.verify else None)
    model, same_weights = built.model(), built.same_weights if plan.verify else None
    prefill = min(DEFAULT_PREFILL_CHUNK, plan.max_context)
    with parked, write_bundle(plan.output, force=plan.force) as writer:
        tokenizer = _write_tokenizer(writer, student, plan.max_context)
        request = ExportRequest(
            model=model,
            writer=writer,
            delegate=plan.delegate,
            max_context=plan.max_context,
            max_prefill=prefill,
            bos_id=student.bos_id,
            eos_ids=student.eos_ids,
            step=step,
            target=plan.target,
            preset=plan.preset,
            gguf_blocks=student.gguf_blocks,
            ternary_blocks=student.ternary_blocks,
            model_name=student.name,
        )
        backend_section = exporter(request)
        del request, model, built  # the gate below loads the fp32 reference: never both in memory
        gc.collect()
        step("write manifest")
        manifest = writer.finish(
            {
                "model": {
                    "name": student.name,
                    "source": student.source,
                    "architecture": student.config.architecture,
                    "parameters": student.config.num_parameters(),
                    "config": student.config.to_dict(),
                },
                "quantization": plan.preset.to_dict(),
                "backend": backend_section,
                "target": plan.target.name,
                "context_length": plan.max_context,
                "tokenizer": tokenizer,
                "generation": {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0},
                "export_seconds": round(time.perf_counter() - started, 1),
            }
        )
        manifest = gate_export(writer, manifest, student, plan.verify, plan.keep_failed, step, same_weights,
                               reference)
    if manifest["verification"]["status"] == "failed":
        raise VerificationFailed(manifest["verification"], kept=plan.output)
    return manifest


def check_loaded(plan: ExportPlan, student: Any) -> ExportPlan:
    """The checks that need the loaded student (still before anything is built); returns the plan with a Hub
    model's context capped at its maximum."""
    if plan.context_from != "--max-context" and plan.max_context > student.config.max_position_embeddings:
        # A Hub id: its maximum is known only now; the target's default is capped at it, as for local models.
        from dataclasses import replace

        plan = replace(plan, max_context=student.config.max_position_embeddings, context_from="the model's maximum")
    if plan.max_context > student.config.max_position_embeddings:
        raise UsageError(
            f"--max-context {plan.max_context} exceeds what {student.name} was trained for "
            f"({student.config.max_position_embeddings})",
            f"use --max-context {student.config.max_position_embeddings} or less",
        )
    if plan.fit is None:  # a Hub id: its config is known only now, still before the model is built
        _fit_check(student.config, plan.target, plan.preset, plan.max_context, plan.backend_label, plan.source)
    # The codes themselves are known only now (a float BitNet checkpoint has the architecture but none), still
    # before anything is built: reading them is lazy.
    check_carried(plan.preset, student.config.architecture, bool(student.ternary_blocks))
    return plan


@dataclass
class BuiltModel:
    """What the exporter lowers (`model()`) and what the gate compares the bundle with (`same_weights`: the
    same quantized weights, read back; None for an unquantized model, whose reference is fp32)."""

    model: Callable[[], Any]
    same_weights: Callable[[], Any] | None


def build_key(plan: ExportPlan) -> tuple[Any, ...]:
    """Cells of a matrix with equal keys build the same model (`quantize.build_quantized`'s inputs)."""
    preset = plan.preset  # activation_ranges 2 builds without smoothing (`quantize._smoothed_parts`)
    return preset.name, preset.group_size, preset.activation_ranges, plan.backend, plan.max_context


def build_for_plan(plan: ExportPlan, student: Any, step: Steps = SILENT, park: Path | None = None) -> BuiltModel:
    """Quantize (or just build) the model the plan's exporter lowers. `park`: a folder where the quantized model
    is written for the gate's same-weights model (read back, not built again)."""
    from edgepack.exporters import exporter_quantizes
    from edgepack.model import UnbuiltModel, piece_count
    from edgepack.quantize import build_quantized, park_quantized

    if exporter_quantizes(plan.backend):  # it writes its graph from the weights, tensor by tensor
        unbuilt = UnbuiltModel(student.config, student.state_dict, plan.max_context)
        return BuiltModel(lambda: unbuilt, None)
    stage = f"quantize ({plan.preset.name}), by layer" if plan.preset.quantized else "build model"
    step(stage, total=piece_count(student.config))
    model = build_quantized(student, plan.preset, plan.backend, plan.max_context, step)
    same_weights = None
    if plan.preset.quantized and park is not None:  # written before the exporter may change the module
        same_weights = park_quantized(model, park)
    return BuiltModel(lambda: model, same_weights)


def shared_build(plan: ExportPlan, student: Any, folder: Path, step: Steps = SILENT) -> Path:
    """The model of `build_for_plan` written once to `folder` for several cells of a matrix; each reads it back
    (`read_shared_build`). An exporter that quantizes itself gets its same-weights model this way."""
    from edgepack.model import piece_count
    from edgepack.quantize import build_quantized, park_quantized

    step(f"quantize ({plan.preset.name}) once for its cells" if plan.preset.quantized else "build model once",
         total=piece_count(student.config))
    model = build_quantized(student, plan.preset, plan.backend, plan.max_context, step)
    folder.mkdir(parents=True, exist_ok=True)
    park_quantized(model, folder)
    del model
    gc.collect()
    return folder / "quantized-model.pt"


def read_shared_build(plan: ExportPlan, student: Any, path: Path) -> BuiltModel:
    """A cell's `BuiltModel` over a `shared_build` file (memory-mapped)."""
    import torch

    from edgepack.exporters import exporter_quantizes
    from edgepack.model import UnbuiltModel

    def load() -> Any:
        return torch.load(path, weights_only=False, mmap=True)  # our own file, written by the matrix's driver

    same_weights = load if plan.preset.quantized else None
    if exporter_quantizes(plan.backend):
        unbuilt = UnbuiltModel(student.config, student.state_dict, plan.max_context)
        return BuiltModel(lambda: unbuilt, same_weights)
    return BuiltModel(load, same_weights)


def _write_tokenizer(writer: Any, student: Any, context_length: int) -> dict[str, Any]:
    """tokenizer.json, a standard tokenizer_config.json (chat template inline), chat_template.jinja, and the
    manifest's tokenizer section, with the chat format as data for apps without Jinja (sdk/chat_format.py)."""
    import json

    from tokenizers import Tokenizer

    from edgepack.chat_format import derive_chat_format, standard_tokenizer_config
    from edgepack.runtime.tokenizer import BundleTokenizer

    files = dict(student.tokenizer_files)
    # The same tokenizer without pretty-printing: 3.4 MB -> 1.6 MB.
    tokenizer = Tokenizer.from_str(files.pop("tokenizer.json").decode("utf-8"))
    writer.write_text("tokenizer.json", tokenizer.to_str(pretty=False))
    source_config = json.loads(files.pop("tokenizer_config.json", b"{}") or b"{}")
    config = standard_tokenizer_config(
        source_config if isinstance(source_config, dict) else {},
        architecture=student.config.architecture, chat_template=student.chat_template,
        token_text=tokenizer.id_to_token, bos_id=student.bos_id, eos_ids=student.eos_ids,
        add_bos=student.add_bos, context_length=context_length,
    )
    writer.write_json("tokenizer_config.json", config)
    for name, data in files.items():  # generation_config.json, ...
        if name != "chat_template.jinja":
            writer.path(name).write_bytes(data)
    template_file, chat_format = None, None
    if student.chat_template:
        template_file = "chat_template.jinja"
        writer.write_text(template_file, student.chat_template)
        chat_format = derive_chat_format(
            BundleTokenizer(tokenizer, config=config, chat_template=student.chat_template).render_chat)
    vocab_has_think = student.chat_template is not None and "<think>" in student.chat_template
    return {
        "file": "tokenizer.json",
        "config_file": "tokenizer_config.json",
        "chat_template_file": template_file,
        "chat_format": chat_format,
        "bos_id": student.bos_id,
        "add_bos": student.add_bos,
        "eos_ids": student.eos_ids,
        "stop_ids": student.eos_ids,
        # Text of every end token: ExecuTorch's LLM runner passes it to the app's token callback before it
        # stops, so an app drops these from the stream (`edgepack run` never emits them).
        "stop_texts": [tokenizer.id_to_token(i) for i in student.eos_ids],
        "think": THINK_TAGS if vocab_has_think else None,
    }
