"""Lower each distinct layer graph to XNNPACK once, not once per layer.

XNNPACK's preprocess runs ~20 graph passes over every delegate, each re-tracing every node under FakeTensors: a few
seconds per layer, most of an int4 export's wall time. A student's layers are one graph over different weights, so
a delegate whose graph matches one lowered before (same ops, arguments, shapes and dtypes: `graph_signature`) takes
that delegate's already-transformed graph over its own weights, and only XNNPACK's serializer runs. This is done only
where the passes neither changed nor added a weight of the first one (checked on it; otherwise every such delegate
is lowered in full), so the serialized bytes are those a full lowering writes (tests/test_xnnpack_pieces.py).
`xnnpack_pieces` calls XNNPACK's preprocess itself for each rebound layer piece, under this context.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Transformed:
    """A delegate graph after XNNPACK's passes, and the weight names its original graph had, in placeholder order."""

    program: Any  # torch.export.ExportedProgram
    weight_names: list[str]
    handles: list[Any]  # the original graph's nodes' debug handles, in node order
    transformed_handles: dict[torch.fx.Node, Any]  # each transformed node's own, as the passes left it


@dataclass
class ReuseCounts:
    lowered: int = 0
    reused: int = 0
    signatures: dict[str, Transformed | None] = field(default_factory=dict)  # None: its passes touch weights


@contextmanager
def reuse_lowered_layers() -> Iterator[ReuseCounts]:
    """While active, XNNPACK's preprocess reuses the transformed graph of any delegate graph seen before.
    ExecuTorch finds backends by class name and offers no hook, so its preprocess and the pass manager it calls
    are swapped for the duration."""
    from executorch.backends.xnnpack import xnnpack_preprocess

    backend = xnnpack_preprocess.XnnpackBackend
    original_preprocess = backend.__dict__["preprocess"]
    pass_manager = xnnpack_preprocess.XNNPACKPassManager
    counts = ReuseCounts()

    def preprocess(program: Any, compile_specs: Any) -> Any:
        key = graph_signature(program) + repr([(spec.key, spec.value) for spec in compile_specs])  # specs pick passes
        seen = counts.signatures.get(key)
        recorded: list[Any] = []
        if seen is not None:
            xnnpack_preprocess.XNNPACKPassManager = _replaying(with_weights_of(seen, program))
            counts.reused += 1
        else:
            xnnpack_preprocess.XNNPACKPassManager = _recording(pass_manager, recorded)
            counts.lowered += 1
        try:
            result = original_preprocess.__func__(program, compile_specs)
        finally:
            xnnpack_preprocess.XNNPACKPassManager = pass_manager
        if recorded and key not in counts.signatures:
            counts.signatures[key] = reusable(program, recorded[0])
        return result

    backend.preprocess = staticmethod(preprocess)
    try:
        yield counts
    finally:
        backend.preprocess = original_preprocess


def _recording(pass_manager: type, into: list[Any]) -> Callable[..., Any]:
    """A stand-in for XNNPACKPassManager that runs it and keeps the transformed program."""

    class Recording:
        def __init__(self, program: Any, passes: Any = None) -> None:
            self.manager = pass_manager(program, passes=passes)

        def transform(self) -> Any:
            into.append(self.manager.transform())
            return into[-1]

    return Recording


def _replaying(program: Any) -> Callable[..., Any]:
    """A stand-in for XNNPACKPassManager whose result is `program` (already transformed)."""

    class Replaying:
        def __init__(self, _program: Any, passes: Any = None) -> None:
            pass

        def transform(self) -> Any:
            return program

    return Replaying


def graph_signature(program: Any) -> str:
    """What XNNPACK's passes and serializer see of a delegate graph, weights' values aside: every node's op,
    target, arguments (other nodes by position), output shape and dtype; each input's kind."""
    index: dict[torch.fx.Node, int] = {}
    kinds = {spec.arg.name: spec.kind.name for spec in program.graph_signature.input_specs
             if hasattr(spec.arg, "name")}

    def arg(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return f"%{index[value]}"
        if isinstance(value, (list, tuple)):
            return [arg(v) for v in value]
        if isinstance(value, dict):
            return {k: arg(v) for k, v in value.items()}
        return repr(value)

    lines = []
    for node in program.graph.nodes:
        index[node] = len(index)
        val = node.meta.get("val")
        shape = [(str(v.shape), str(v.dtype)) for v in (val if isinstance(val, (list, tuple)) else [val])
                 if isinstance(v, torch.Tensor)]
        lines.append(repr((node.op, kinds.get(node.name), str(node.target) if node.op != "placeholder" else "",
                           arg(node.args), arg(node.kwargs), shape)))
    return "\n".join(lines)


def _weight_names(program: Any) -> list[str]:
    """The state-dict / constant names of a graph's weight inputs, in placeholder order."""
    signature = program.graph_signature
    by_input = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
                **signature.inputs_to_lifted_tensor_constants}
    return [by_input[node.name] for node in program.graph.nodes if node.op == "placeholder" and node.name in by_input]


def weight_tensor(program: Any, name: str) -> Any:
    """A program's weight by its state-dict or constant name."""
    return program.state_dict[name] if name in program.state_dict else program.constants[name]


def reusable(original: Any, transformed: Any) -> Transformed | None:
    """The transformed program if XNNPACK's passes left every weight as the original graph held it (same tensor
    objects, none added, no graph attributes): only then is it valid over another layer's weights."""
    names = _weight_names(original)
    after = _weight_names(transformed)
    if not set(after) <= set(names):
        return None
    if any(node.op == "get_attr" for node in transformed.graph.nodes):
        return None
    if any(weight_tensor(transformed, name) is not weight_tensor(original, name) for name in after):
        return None
    return Transformed(transformed, names, _handles(original),
                       {node: node.meta.get("debug_handle") for node in transformed.graph.nodes})


def _handles(program: Any) -> list[Any]:
    return [node.meta.get("debug_handle") for node in program.graph.nodes]


def with_weights_of(seen: Transformed, program: Any) -> Any:
    """`seen`'s transformed program over `program`'s weights (matched by placeholder position) and with its
    nodes' debug handles."""
    renamed = dict(zip(seen.weight_names, _weight_names(program)))
    state_dict = {name: weight_tensor(program, renamed[name]) for name in seen.program.state_dict if name in renamed}
    constants = {name: weight_tensor(program, renamed[name]) for name in seen.program.constants if name in renamed}
    # Debug handles tie the delegate's operators to the program's nodes (ExecuTorch's profiler): this program's own.
    handles = dict(zip(seen.handles, _handles(program)))
    for node, handle in seen.transformed_handles.items():
        if handle is not None:
            node.meta["debug_handle"] = handles.get(handle, handle)
    rebound = copy.copy(seen.program)
    rebound._state_dict, rebound._constants = state_dict, constants
    return rebound
