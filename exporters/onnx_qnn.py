"""The Snapdragon NPU flavour of the ONNX exporter: static-shape graphs, QDQ-quantized, compiled offline
by onnxruntime-qnn into EPContext models (`npu_*_ctx.onnx` + a QNN context binary) for one SoC.

Why static and QDQ: the Hexagon HTP runs fixed shapes and integer math only (an fp32 graph fails to
allocate on it). So there are two graphs over a fixed context C: prefill (T = chunk tokens) and decode
(T = 1), each reading `past [1, kv, C - T, D]`; activations are 16-bit and weights 8-bit (or 4-bit) by
default, calibrated on real English text (edgepack.evaltext) run through the same host loop the runtime
uses. Position 0 (the attention sink, with activations ~30x any other position's) is left to the bundle's
CPU model at run time and so is kept out of the calibrated ranges (runtime/onnxruntime_backend.py).
The QNN EP silently compiles for a default SoC when it does not know the one named, so the SoC and
HTP arch are checked against the table below before anything runs, and the SoC id is read back from
every compiled binary.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError, UsageError
from edgepack.exporters import ExportRequest

QNN_PIN = "onnxruntime-qnn==2.7.0"
# soc_model -> (SoC id the QNN SDK writes into a context binary, Hexagon HTP arch). Ids as QNN 2.51's HTP
# backend reports them in compiled binaries (read back on this machine, see ../shared/notes/onnx-and-qnn.md).
SOCS: dict[str, tuple[int, int]] = {
    "SM8550": (43, 73),  # Snapdragon 8 Gen 2
    "SM8650": (57, 75),  # Snapdragon 8 Gen 3
    "SC8380XP": (60, 73),  # Snapdragon X Elite
    "SM8750": (69, 79),  # Snapdragon 8 Elite
    "SC8480XP": (88, 81),  # Snapdragon X2 Elite
}
DEFAULTS = {"npu_context": 1024, "npu_prefill": 64, "npu_weight_bits": 8, "npu_activation_bits": 16}
CALIBRATION_OFFSET = 4096  # calibrate on text after the first tokens, which verification reads
CHECK_TOKENS = 512
GRAPHS = ("prefill", "decode")


def target_options(target: Any) -> dict[str, Any]:
    """The target's [options.onnx] over DEFAULTS, unchecked (the fit check reads them before anything is installed)."""
    return {**DEFAULTS, **((getattr(target, "options", None) or {}).get("onnx") or {})}


def npu_options(target: Any) -> dict[str, Any]:
    """The target's [options.onnx], validated: onnxruntime-qnn installed, SoC known, arch consistent."""
    try:
        import onnxruntime_qnn  # noqa: F401  (a small module: paths to the QNN libraries)
    except ImportError:
        raise EdgepackError("onnxruntime-qnn is not installed (it compiles the NPU models)", f"pip install {QNN_PIN}") from None
    name = getattr(target, "name", "?")
    options = target_options(target)
    soc = str(options.get("soc_model", ""))
    if soc not in SOCS:
        raise UsageError(
            f"target {name!r}: unknown Snapdragon soc_model {soc!r} (the QNN EP would silently build for another chip)",
            f"set [options.onnx] soc_model to one of: {', '.join(SOCS)}",
        )
    soc_id, arch = SOCS[soc]
    if int(options.get("htp_arch", arch)) != arch:
        raise UsageError(
            f"target {name!r}: htp_arch {options['htp_arch']} does not match {soc} (Hexagon v{arch})",
            f"set [options.onnx] htp_arch = {arch}",
        )
    if int(options["npu_weight_bits"]) not in (4, 8) or int(options["npu_activation_bits"]) not in (8, 16):
        raise UsageError(f"target {name!r}: npu_weight_bits must be 4 or 8, npu_activation_bits 8 or 16")
    return {**options, "soc_model": soc, "soc_id": soc_id, "htp_arch": arch}


def check_npu_budget(config: Any, options: dict[str, Any], target: Any) -> None:
    """Refuse a model whose NPU weights exceed the target's budget, before calibration and compilation."""
    limit = options.get("npu_max_weights_mb")
    need = config.num_parameters() * int(options["npu_weight_bits"]) / 8 / 1e6
    if limit is not None and need > float(limit):
        raise EdgepackError(
            f"the model needs ~{need:.0f} MB of {options['npu_weight_bits']}-bit weights on the NPU, more than "
            f"target {target.name!r} allows ({limit} MB)",
            "pick a smaller student, or export for the CPU with --backend onnx/cpu",
        )


def ep_options(options: dict[str, Any]) -> dict[str, str]:
    return {"backend_type": "htp", "soc_model": options["soc_model"], "htp_arch": str(options["htp_arch"])}


def export_npu(request: ExportRequest, options: dict[str, Any]) -> dict[str, Any]:
    """Build, calibrate, quantize and compile both graphs into the bundle; returns the manifest's npu section."""
    import onnxruntime_qnn

    from edgepack.model import rope_frequencies

    cfg = request.model.config
    context = request.max_context  # the plan capped it at options["npu_context"] (`npu_context` in onnx.py)
    prefill = min(int(options["npu_prefill"]), context // 2)
    keep = os.environ.get("EDGEPACK_QNN_WORK")  # debugging aid: keep the fp32 and QDQ graphs in this folder
    with tempfile.TemporaryDirectory(prefix="edgepack-qnn-") as tmp:
        work = Path(keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        graphs = write_static_graphs(request.model, work, context, prefill, request.step)
        # position 0 as the runtime computes it (the bundle's CPU model): never part of the calibrated ranges
        first, tokenizer = cpu_first_position(request, context), staged_tokenizer(request)
        request.step("calibrate on real text")
        # fp32 sessions are opened per step, not held: for a 1.5B student they are ~14 GB, and the quantizer
        # loads the graphs again in between
        feeds = calibration_feeds(cpu_sessions(graphs), first, tokenizer, cfg, context, prefill, options)
        quantized = {g: work / f"{g}_qdq.onnx" for g in GRAPHS}
        for graph in GRAPHS:
            request.step(f"quantize {graph} graph (QDQ a{options['npu_activation_bits']}w{options['npu_weight_bits']})")
            quantize_qdq(graphs[graph], quantized[graph], feeds[graph], options)
        request.step(f"check the quantized graphs against fp32 ({CHECK_TOKENS} tokens, ONNX Runtime CPU)")
        check = check_quantized(cpu_sessions(graphs), cpu_sessions(quantized), first, tokenizer, cfg, context, prefill)
        files: dict[str, str] = {}
        for graph in GRAPHS:
            request.step(f"compile {graph} graph for {options['soc_model']} (QNN HTP)")
            files[graph] = compile_context(quantized[graph], request.writer.path(f"npu_{graph}_ctx.onnx"), options)
    return {
        "prefill_program": "npu_prefill_ctx.onnx",
        "decode_program": "npu_decode_ctx.onnx",
        "context_binaries": [files[g] for g in GRAPHS],
        "context": context,
        "prefill_len": prefill,
        "ep": "QNNExecutionProvider",
        "ep_options": ep_options(options),
        "soc_id": options["soc_id"],
        "qnn_sdk": onnxruntime_qnn.build_and_package_info.qnn_version,
        "onnxruntime_qnn": onnxruntime_qnn.__version__,
        "quantization": f"QDQ: {options['npu_activation_bits']}-bit activations, "
        f"{options['npu_weight_bits']}-bit per-channel weights, MinMax calibration on {len(feeds['prefill'])} "
        f"prefill and {len(feeds['decode'])} decode steps of held-out prose and chat turns (edgepack.evaltext)",
        "inv_freq": [float(f) for f in rope_frequencies(cfg)],
        "mask_value": -80.0,
        "first_position": "cpu",  # position 0 runs on the CPU model (the attention sink, see the runtime)
        "quantization_check": check,
        "inputs": "input_ids[1,T] int32, cos/sin[T,head_dim], attention_mask[T,C] additive, "
        "past_key_i/past_value_i[1,kv_heads,C-T,head_dim]",
        "outputs": "logits[1,T,vocab], new_key_i/new_value_i[1,kv_heads,T,head_dim]",
    }


def write_static_graphs(model: Any, work: Path, context: int, prefill: int, step: Any) -> dict[str, Path]:
    import onnx

    from edgepack.exporters.onnx_graph import GraphSpec, build_decoder

    paths = {}
    for graph, seq in (("prefill", prefill), ("decode", 1)):
        step(f"write static {graph} graph (T={seq}, C={context})")
        paths[graph] = work / f"{graph}_fp32.onnx"
        proto = build_decoder(model, GraphSpec("fp32", static_seq=seq, static_context=context))
        onnx.save_model(proto, str(paths[graph]), save_as_external_data=True, location=f"{graph}_fp32.data")
    return paths


def calibration_feeds(fp32: dict[str, Any], first: Any, tokenizer: Any, cfg: Any, context: int, prefill: int,
                      options: dict[str, Any]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the fp32 static graphs (ORT sessions) through the runtime's own host loop and record every feed: a
    long prose passage (prefill chunks, then decode steps spread over the context) and a few chat turns
    rendered with the model's template, prompt prefilled and reply decoded as at run time (template tokens
    have activations prose never shows: with them top-1 went 86.7% -> 88.5% on SmolLM2-135M)."""
    from edgepack.evaltext import default_text

    prose = tokenizer.encode(default_text(min_chars=80_000))[CALIBRATION_OFFSET:]
    prefill_tokens = min(int(options.get("calibration_prefill_tokens", 256)), context - prefill)
    decode_tokens = min(int(options.get("calibration_decode_tokens", 128)), context - prefill_tokens)
    sequences = [(prose[:prefill_tokens], prose[prefill_tokens : prefill_tokens + decode_tokens])]
    sequences += chat_turns(tokenizer, int(options.get("calibration_chats", 2)), context)
    recorded: dict[str, list] = {g: [] for g in GRAPHS}
    every = max(1, int(options.get("calibration_decode_stride", 16)))
    count = {"decode": 0}

    def record(graph: str, feeds: dict) -> None:
        if graph == "decode":  # keep every n-th decode step: positions spread over the context
            count["decode"] += 1
            if count["decode"] % every:
                return
        recorded[graph].append({k: v.copy() for k, v in feeds.items()})

    decoder = static_decoder(fp32, cfg, context, prefill, first=first, record=record)
    for prompt, reply in sequences:
        decoder.reset()
        decoder.forward(np.array(prompt), 0)
        for i, token in enumerate(reply):
            decoder.forward(np.array([token]), len(prompt) + i)
    return recorded


def staged_tokenizer(request: ExportRequest) -> Any:
    """The bundle's tokenizer and chat template, from the staging folder (written before the exporter runs)."""
    from edgepack.runtime.tokenizer import BundleTokenizer

    template = request.writer.path("chat_template.jinja")
    return BundleTokenizer.from_files(request.writer.path("tokenizer.json"), request.writer.path("tokenizer_config.json"),
                                      template if template.is_file() else None)


def chat_turns(tokenizer: Any, count: int, context: int, reply_tokens: int = 64) -> list[tuple[list[int], list[int]]]:
    """`count` (prompt ids, reply ids) pairs: held-out paragraphs as a user turn and the assistant's reply,
    rendered with the chat template. None for a model without a template."""
    from edgepack.evaltext import calibration_text

    if not tokenizer.chat_template:
        return []
    paragraphs = [p for p in calibration_text().split("\n\n") if len(p) > 200]
    turns = []
    for user, reply in zip(paragraphs[0 : 2 * count : 2], paragraphs[1 : 2 * count : 2]):
        messages = [{"role": "user", "content": user[:600]}, {"role": "assistant", "content": reply[:900]}]
        prompt = tokenizer.encode(tokenizer.render_chat(messages[:1]), add_special=False)
        full = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=False), add_special=False)
        if full[: len(prompt)] == prompt and len(prompt) + reply_tokens <= context:
            turns.append((prompt, full[len(prompt) : len(prompt) + reply_tokens]))
    return turns


def cpu_sessions(graphs: dict[str, Path]) -> dict[str, Any]:
    import onnxruntime as ort

    return {g: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for g, p in graphs.items()}


def static_decoder(sessions: dict[str, Any], cfg: Any, context: int, prefill: int, **kwargs: Any) -> Any:
    """The runtime's host loop over two ORT sessions (fp32 or QDQ graphs, run on the CPU)."""
    from edgepack.model import rope_frequencies
    from edgepack.runtime.onnxruntime_backend import StaticGraphDecoder

    return StaticGraphDecoder(lambda g, f: sessions[g].run(None, f), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                              context, prefill, cfg.vocab_size, rope_frequencies(cfg).numpy(), **kwargs)


def cpu_first_position(request: ExportRequest, context: int) -> Any:
    from edgepack.exporters.onnx import CPU_PROGRAM
    from edgepack.runtime.onnxruntime_backend import OrtCpuDecoder

    cfg = request.model.config
    return OrtCpuDecoder(request.writer.path(CPU_PROGRAM), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, context,
                         cfg.vocab_size)


def check_quantized(fp32: dict[str, Any], quantized: dict[str, Any], first: Any, tokenizer: Any, cfg: Any,
                    context: int, prefill: int) -> dict[str, Any]:
    """Teacher-force the QDQ graphs against the fp32 graphs (ORT sessions) on the evaluation text, before
    compiling: ORT CPU runs the same fixed-point math as the HTP, in seconds where the x86 simulator takes ~20 s
    a token. A build that would babble on the NPU fails the export here, with the figures ([npu_qdq])."""
    from edgepack.evaltext import default_text
    from edgepack.runtime import Session
    from edgepack.verify import teacher_forcing, thresholds_for

    reference = Session(static_decoder(fp32, cfg, context, prefill), tokenizer)
    candidate = Session(static_decoder(quantized, cfg, context, prefill, first=first), tokenizer)
    ids = tokenizer.encode(default_text())[: CHECK_TOKENS + 1]
    agreement = teacher_forcing(reference, candidate, ids, window=context)
    failures = thresholds_for("npu_qdq", "onnx", "qnn").failures(agreement)
    if failures:
        raise EdgepackError(
            f"the NPU build does not track the fp32 model ({'; '.join(failures)} over {agreement.tokens} tokens)",
            "raise npu_weight_bits / npu_activation_bits in the target's [options.onnx], or use --backend onnx/cpu",
        )
    return {"runtime": "ONNX Runtime CPU on the QDQ graphs", **agreement.to_dict()}


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_qdq(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], options: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    act = QuantType.QUInt16 if int(options["npu_activation_bits"]) == 16 else QuantType.QUInt8
    weight = QuantType.QInt4 if int(options["npu_weight_bits"]) == 4 else QuantType.QUInt8
    config = get_qnn_qdq_config(
        str(src), _Reader(feeds), activation_type=act, weight_type=weight, per_channel=True,
        weight_symmetric=True if weight == QuantType.QInt4 else None,
        init_overrides={name: [{"quant_type": act}] for name in elementwise_constants(src)},
    )
    config.use_external_data_format = True
    quantize(str(src), str(dst), config)


def elementwise_constants(model: Path) -> list[str]:
    """Initializers that are no matmul/gather weights (RMSNorm gains, eps, biases): they get the activation
    precision, since at 8 bits per tensor a gain with outliers loses its ordinary channels."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    names = {init.name for init in proto.graph.initializer}
    weights = {n.input[1] for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")} | {
        n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    return sorted({i for n in proto.graph.node for i in n.input if i in names and i not in weights})


def compile_context(model: Path, ctx_path: Path, options: dict[str, Any]) -> str:
    """Compile with the QNN EP (HTP) into `ctx_path` + one context binary; returns the binary's file name
    after checking the SoC id inside it."""
    from edgepack.runtime.onnxruntime_backend import qnn_session

    before = set(ctx_path.parent.iterdir())
    qnn_session(model, ep_options(options), {
        "ep.context_enable": "1",
        "ep.context_file_path": str(ctx_path),
        "ep.context_embed_mode": "0",
    })
    binaries = [p for p in set(ctx_path.parent.iterdir()) - before if p.suffix == ".bin"]
    if not ctx_path.is_file() or len(binaries) != 1:
        raise EdgepackError(f"the QNN EP did not write {ctx_path.name} and one context binary", "see the log above")
    found = soc_id_of(binaries[0])
    if found != options["soc_id"]:
        raise EdgepackError(
            f"the context binary was compiled for SoC id {found}, not {options['soc_model']} ({options['soc_id']})",
            "check [options.onnx] soc_model and the onnxruntime-qnn version",
        )
    return binaries[0].name


# In QNN 2.51 HTP context binaries the SoC id follows a fixed record in the header (found by compiling the
# same graph for every SoC in SOCS and diffing: only this word changes, to the SoC's id).
_SOC_RECORD = re.compile(rb"\x06\x00\x00\x00.{4}\x01\x00\x00\x00\x20\x00\x00\x00.{4}\x08\x00\x00\x00.{4}(.{4})", re.DOTALL)


def soc_id_of(binary: Path) -> int | None:
    """The SoC id a QNN HTP context binary was compiled for (None if the header is not recognised)."""
    with binary.open("rb") as f:
        head = f.read(4096)
    found = _SOC_RECORD.search(head)
    return int.from_bytes(found.group(1), "little") if found else None
