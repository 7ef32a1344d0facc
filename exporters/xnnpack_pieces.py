"""Lower a program to XNNPACK piece by piece: each distinct piece once, every other one by rebinding weights.

ExecuTorch lowers a whole program through ~10 whole-program passes (two decompositions, the edge dialect's passes,
partitioning), each re-tracing every node with FakeTensors, before XNNPACK's own ~20 per delegate: for a student of
30 layers that are one graph over 30 sets of weights, minutes of tracing the same layer. Here the program names its
XNNPACK parts instead (`nn.Module` pieces whose every op lowers: a layer's projections and MLP, the output layer)
and each piece is replaced by a call of its delegate before the program is exported:

- the first piece of each structure (classes, attributes, weight shapes: `structure_key`) goes through ExecuTorch's
  lowering in full, and must become exactly one delegate;
- a piece of a structure lowered before takes that delegate's graph over its own weights, matched by name, and
  only XNNPACK's serializer runs for it (`xnnpack_reuse` replays the transformed graph);
- ExecuTorch's whole-program passes then see only the glue between delegates (KV cache, attention, embedding),
  a few nodes per layer, and each delegate answers their re-tracing with its output shapes (`_ShapesOnly`) rather
  than a run of its graph.

The delegates' bytes are those of ExecuTorch's own lowering of each piece (tests/test_xnnpack_pieces.py).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgepack.exporters.xnnpack_reuse import weight_tensor


class Delegated(nn.Module):
    """A lowered piece in the program: its delegate, called with the piece's inputs and the weights the delegate
    takes per call (those XNNPACK does not hold: norm weights, scalars), outputs in the piece's order."""

    def __init__(self, lowered: Any, arguments: list[int | str], weights: dict[str, torch.Tensor],
                 outputs: list[int]) -> None:
        super().__init__()
        self.lowered = lowered
        self.arguments = [a if isinstance(a, int) else f"w{list(weights).index(a)}" for a in arguments]
        for index, tensor in enumerate(weights.values()):  # plain tensors: a Parameter would be one of the program's
            self.register_buffer(f"w{index}", tensor.detach(), persistent=False)
        self.outputs = outputs

    def forward(self, *inputs: torch.Tensor) -> Any:
        results = self.lowered(*(inputs[a] if isinstance(a, int) else getattr(self, a) for a in self.arguments))
        ordered = tuple(results[i] for i in self.outputs)
        return ordered if len(ordered) > 1 else ordered[0]


@dataclass
class _Kind:
    """The first lowered piece of a structure: what another piece of it needs to be rebound."""

    program: Any  # the piece's edge program after lowering (one delegate call)
    lowered: Any  # its LoweredBackendModule
    arguments: list[int | str]  # per delegate argument: the piece's input index, or a weight's name
    outputs: list[int]  # per piece output: the delegate output it is
    rebindable: bool  # ExecuTorch's passes left every weight the piece's own tensor


class PieceLowerer:
    """`lowerer(piece, inputs, token_dims)` -> the piece's `Delegated`; `token_dims[i]`: the dimension of input i
    that is the token count (dynamic, up to `max_tokens`), or None. `on_piece` is called after each piece."""

    def __init__(self, max_tokens: int, partitioner: Callable[[], Any], compile_config: Any,
                 on_piece: Callable[[], None] = lambda: None) -> None:
        self.tokens = torch.export.Dim("seq", min=1, max=max_tokens)
        self.partitioner, self.compile_config, self.on_piece = partitioner, compile_config, on_piece
        self.kinds: dict[str, _Kind] = {}
        self.lowered = self.rebound = 0

    def __call__(self, piece: nn.Module, inputs: tuple[torch.Tensor, ...],
                 token_dims: tuple[int | None, ...]) -> Delegated:
        key = structure_key(piece)
        kind = self.kinds.get(key)
        if kind is None or not kind.rebindable:
            kind = self._lower(piece, inputs, token_dims)
            self.kinds.setdefault(key, kind)
            self.lowered += 1
            lowered, weights = kind.lowered, lambda name: weight_tensor(kind.program, name)
        else:
            lowered, weights = self._rebind(kind, piece), lambda name: _piece_tensor(piece, name, kind.program)
            self.rebound += 1
        self.on_piece()
        return Delegated(_traced_by_shapes(lowered), kind.arguments,
                         {a: weights(a) for a in kind.arguments if isinstance(a, str)}, kind.outputs)

    def _lower(self, piece: nn.Module, inputs: tuple[torch.Tensor, ...], token_dims: tuple[int | None, ...]) -> _Kind:
        from executorch.exir import to_edge_transform_and_lower
        from executorch.exir.delegate import executorch_call_delegate

        dynamic = tuple(None if d is None else {d: self.tokens} for d in token_dims)
        with torch.no_grad():  # non-strict: Python tracing, 2x faster than TorchDynamo here and the same graph
            exported = torch.export.export(piece, inputs, dynamic_shapes=dynamic, strict=False)
        for node in exported.graph.nodes:
            # Provenance records: every later pass deep-copies a node's whole chain of them.
            node.meta.pop("from_node", None)
        edge = to_edge_transform_and_lower(exported, partitioner=[self.partitioner()],
                                           compile_config=self.compile_config)
        program = edge.exported_program()
        nodes = [n for n in program.graph.nodes if n.op == "call_function"]
        calls = [n for n in nodes if n.target is executorch_call_delegate]
        left = sorted({str(n.target) for n in nodes if n.target not in (executorch_call_delegate, operator.getitem)})
        if len(calls) != 1 or left:
            raise RuntimeError(f"XNNPACK did not take all of {type(piece).__name__} as one delegate "
                               f"({len(calls)} delegates; left outside: {left}): its ops must all lower")
        (call,) = calls
        signature = program.graph_signature
        user = {name: index for index, name in enumerate(signature.user_inputs)}
        weights = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
                   **signature.inputs_to_lifted_tensor_constants}
        arguments = [user[a.name] if a.name in user else weights[a.name] for a in call.args[1:]]
        results = program.graph.output_node().args[0]
        if not all(r.target is operator.getitem and r.args[0] is call for r in results):
            raise RuntimeError(f"{type(piece).__name__}: an output does not come from its delegate")
        lowered = getattr(program.graph_module, call.args[0].target)
        kind = _Kind(program, lowered, arguments, [r.args[1] for r in results], True)
        kind.rebindable = all(_is_own(piece, name, tensor) for name, tensor in _weights(kind))
        return kind

    def _rebind(self, kind: _Kind, piece: nn.Module) -> Any:
        """The kind's delegate over `piece`'s weights; XNNPACK's preprocess (under `reuse_lowered_layers`) replays
        the kind's transformed graph and serializes these weights."""
        from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
        from executorch.exir.lowered_backend_module import LoweredBackendModule

        first = kind.lowered
        original = first.original_module
        program = copy.copy(original)
        program._state_dict = {n: _piece_tensor(piece, n, original) for n in original.state_dict}
        program._constants = {n: _piece_tensor(piece, n, original) for n in original.constants}
        result = XnnpackBackend.preprocess(program, first.compile_specs)
        lowered = LoweredBackendModule(program, first.backend_id, result.processed_bytes, first.compile_specs,
                                       result.data_store_output)
        lowered.meta = {"debug_handle_map": result.debug_handle_map}
        return lowered


def _weights(kind: _Kind) -> list[tuple[str, torch.Tensor]]:
    """Every weight the kind's delegate holds (its program's) or takes per call (the piece program's)."""
    original = kind.lowered.original_module
    return [*original.state_dict.items(), *original.constants.items(),
            *((a, weight_tensor(kind.program, a)) for a in kind.arguments if isinstance(a, str))]


def _attribute(piece: nn.Module, name: str) -> torch.Tensor | None:
    """The piece's tensor at a dotted name (parameter, buffer or plain tensor attribute), or None: a constant
    ExecuTorch made from the graph's scalars (`_lifted_tensor_constant*`), the same for every piece of a kind."""
    try:
        found = operator.attrgetter(name)(piece)
    except AttributeError:
        return None
    return found if isinstance(found, torch.Tensor) else None


def _piece_tensor(piece: nn.Module, name: str, fallback: Any) -> torch.Tensor:
    own = _attribute(piece, name)
    return own if own is not None else weight_tensor(fallback, name)


def _is_own(piece: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Whether the lowered program holds the piece's own tensor under `name` (not one ExecuTorch's passes made)."""
    own = _attribute(piece, name)
    if own is None:
        return name.startswith("_lifted_tensor_constant")
    return own is tensor or (own.shape == tensor.shape and own.dtype == tensor.dtype and torch.equal(own, tensor))


def structure_key(module: nn.Module) -> str:
    """What a piece's graph depends on besides its weights' values: each submodule's class and attributes, each
    tensor's name, type, shape and dtype. Two pieces with the same key trace to the same graph."""
    lines = []
    for path, sub in module.named_modules():
        lines.append(f"{path}: {type(sub).__module__}.{type(sub).__qualname__}")
        for name, value in sorted(vars(sub).items()):
            if not name.startswith("_") and name != "training":
                lines.append(f"{path}.{name} = {_describe(value)}")
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            lines.append(f"{path}.{name} = {_describe(tensor)}")
    return "\n".join(lines)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{type(value).__name__}{tuple(value.shape)} {value.dtype}"
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return repr([_describe(v) for v in value])
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return f"unknown {type(value).__name__} at {id(value)}"  # never equal to another piece's: no rebinding


class _ShapesOnly(torch.export.ExportedProgram):
    """A delegate's original program whose `module()` makes empty outputs of the right shapes and dtypes.
    ExecuTorch's `executorch_call_delegate` runs `original_module.module()` wherever a pass re-traces a delegate
    call (every pass over the glue program, under FakeTensors): the graph's ~100 nodes each time, for a result only
    its shapes are read from. The graph itself stays for what reads it (the emitter's debug handles)."""

    _shapes: Callable[..., tuple[torch.Tensor, ...]]

    def module(self, check_guards: bool = True) -> Any:  # noqa: ARG002 (ExportedProgram's signature)
        return self._shapes


def _traced_by_shapes(lowered: Any) -> Any:
    """`lowered` with an original program that answers tracing with shapes (see `_ShapesOnly`); unchanged where an
    output's size is not one of an input's (not in our pieces)."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    original = lowered.original_module
    shapes = _output_shapes(original)
    if shapes is None:
        return lowered
    view = copy.copy(original)
    view.__class__ = _ShapesOnly
    view._shapes = shapes
    traced = LoweredBackendModule(view, lowered.backend_id, lowered.processed_bytes, lowered.compile_specs,
                                  lowered.named_data_store_output)
    traced.meta = getattr(lowered, "meta", None)
    return traced


def _output_shapes(program: Any) -> Callable[..., tuple[torch.Tensor, ...]] | None:
    """A function of the program's user inputs giving empty tensors shaped as its outputs: each symbolic size is
    read from the input dimension that has it."""
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    sources = {}
    for index, node in enumerate(inputs):
        for dim, size in enumerate(node.meta["val"].shape):
            if isinstance(size, torch.SymInt):
                sources.setdefault(str(size), (index, dim))
    layouts = []
    for result in program.graph.output_node().args[0]:
        value = result.meta["val"]
        dims = []
        for size in value.shape:
            if isinstance(size, torch.SymInt):
                if str(size) not in sources:
                    return None
                dims.append(sources[str(size)])
            else:
                dims.append(int(size))
        layouts.append((dims, value.dtype))

    def shapes(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(args[0].new_empty([args[d[0]].shape[d[1]] if isinstance(d, tuple) else d for d in dims],
                                       dtype=dtype) for dims, dtype in layouts)

    return shapes
