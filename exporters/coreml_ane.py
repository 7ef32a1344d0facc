"""Which ops of a converted Core ML program would leave the Apple Neural Engine, read off the MIL program.

Core ML decides placement at load time on the device and Apple publishes no op list for the ANE, so this
is a static check of the rules that are documented or widely measured:
- the ANE computes in fp16 only: an op producing or consuming fp32 runs on the GPU/CPU; integer and bool
  tensors (position arithmetic, comparisons, casts from int) are CPU work;
- shapes must be static;
- gathers/scatters with run-time indices, loops and conditionals, sorting, `range_1d` are not ANE ops;
- tensors with a dimension above 16384 or a rank above 5 do not fit the ANE (Apple's ml-ane-transformers
  and community measurements; e.g. a 49152-wide vocabulary projection).
Weight constants (`const`, `constexpr_*`) are decompressed at load time and are not placed.
Each op is attributed to a region by its torch.export stack trace: inputs (positions, masks, embedding),
decoder_layers, head.
"""

from __future__ import annotations

from typing import Any

ANE_MAX_DIM = 16384
ANE_MAX_RANK = 5
NOT_ON_ANE = {
    "gather": "gather with run-time indices",
    "gather_nd": "gather with run-time indices",
    "gather_along_axis": "gather with run-time indices",
    "scatter": "scatter",
    "scatter_nd": "scatter",
    "scatter_along_axis": "scatter",
    "range_1d": "range_1d",
    "non_zero": "data-dependent shape",
    "topk": "sorting",
    "argsort": "sorting",
    "cumsum": "cumulative sum",
    "while_loop": "control flow",
    "cond": "control flow",
}
# torch.export keeps the source line of each module call in the stack trace: the wrapper calls these.
REGION_MARKERS = (("self.decoder_layer(", "decoder_layers"), ("self.head(", "head"))


def _region(op: Any) -> str:
    for source, values in op.scopes.items():
        if "STACK_TRACE" in str(source):
            trace = " ".join(str(v) for v in values)
            for marker, region in REGION_MARKERS:
                if marker in trace:
                    return region
            return "inputs"
    return "inputs"


def _all_ops(block: Any):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _all_ops(inner)


def _concrete(shape: tuple) -> tuple[list[int | str], bool]:
    """The shape as ints (symbols as strings); True when a dimension is symbolic (a dynamic shape)."""
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    out = [str(d) if is_symbolic(d) else int(d) for d in shape]
    return out, any(isinstance(d, str) for d in out)


def _reasons(op: Any) -> list[str]:
    from coremltools.converters.mil.mil import types

    reasons: list[str] = []
    if op.op_type in NOT_ON_ANE:
        reasons.append(f"{NOT_ON_ANE[op.op_type]} is not an ANE op")
    tensors = [v for v in op.outputs] + [
        v for v in op.inputs.values() if hasattr(v, "dtype") and v.op is not None and v.op.op_type != "const"
    ]
    for var in tensors:
        if not types.is_tensor(var.sym_type) and not types.is_scalar(var.sym_type):
            continue
        dtype = var.dtype
        if dtype == types.fp32:
            reasons.append("fp32 compute")
        elif types.is_int(dtype) or dtype == types.bool:
            reasons.append(f"{types.builtin_to_string(dtype)} compute")
        if types.is_tensor(var.sym_type):
            shape, dynamic = _concrete(var.shape)
            if dynamic:
                reasons.append("dynamic shape")
            big = [d for d in shape if isinstance(d, int) and d > ANE_MAX_DIM]
            if big:
                reasons.append(f"dimension {max(big)} over the ANE limit {ANE_MAX_DIM}")
            if len(shape) > ANE_MAX_RANK:
                reasons.append(f"rank {len(shape)} over {ANE_MAX_RANK}")
    return sorted(set(reasons))


def ane_report(prog: Any, input_tokens: int | str, function: str = "main") -> dict[str, Any]:
    """Op census and the ops that would not run on the ANE, by region, for the manifest. `input_tokens`: the
    function's query length, a number or a range such as "1..2048" (a ranged function is all dynamic shapes)."""
    from coremltools.converters.mil.mil import types

    main = prog.functions[function]
    census: dict[str, dict[str, int]] = {}
    flagged: dict[tuple[str, str, str], dict[str, Any]] = {}
    dtypes: dict[str, int] = {}
    weights = 0
    for op in _all_ops(main):
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            weights += op.op_type.startswith("constexpr_")
            continue
        region = _region(op)
        census.setdefault(region, {})
        census[region][op.op_type] = census[region].get(op.op_type, 0) + 1
        for var in op.outputs:
            name = types.builtin_to_string(var.dtype) if var.dtype is not None else "?"
            dtypes[name] = dtypes.get(name, 0) + 1
        reasons = _reasons(op)
        if reasons:
            key = (region, op.op_type, "; ".join(reasons))
            entry = flagged.setdefault(
                key, {"region": region, "op": op.op_type, "reasons": reasons, "count": 0, "example": op.name}
            )
            entry["count"] += 1
    states = []
    for name, var in main.inputs.items():
        if types.is_state(var.sym_type):
            shape = [int(d) for d in var.sym_type.wrapped_type().get_shape()]
            dtype = types.builtin_to_string(var.sym_type.wrapped_type().get_primitive())
            states.append(
                {"name": name, "shape": shape, "dtype": dtype, "aligned": shape[-1] * 2 % 64 == 0 and shape[-2] % 64 == 0}
            )
    off_ane = sorted(flagged.values(), key=lambda e: (e["region"], e["op"]))
    return {
        "method": "static rules on the MIL program (see edgepack/exporters/coreml_ane.py); placement is decided on device",
        "input_tokens": input_tokens,
        "ops": census,
        "output_dtypes": dtypes,
        "compressed_weights": weights,
        "states": states[:2] + ([{"more": len(states) - 2}] if len(states) > 2 else []),
        "states_aligned": all(s["aligned"] for s in states),
        "off_ane": off_ane,
        "decoder_layers_on_ane": not any(e["region"] == "decoder_layers" for e in off_ane),
    }
