"""The ExecuTorch program is lowered piece by piece (`exporters/xnnpack_pieces.py`): a layer's graph once, the other
layers rebound over their own weights. The program must be the one lowering every piece in full writes, byte for byte,
and layers must in fact be rebound."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from edgepack.exporters import executorch, xnnpack_pieces
from edgepack.exporters.executorch import Metadata, lower_to_pte
from edgepack.quantize import apply_preset, get_preset

from conftest import random_model, tiny_config
from test_blocks import synthetic_blocks


def lowered(model, monkeypatch) -> tuple[bytes, xnnpack_pieces.PieceLowerer]:
    """The program's bytes and the lowerer that made it (its counts of pieces lowered and rebound)."""
    meta = Metadata(bos_id=1, eos_ids=[2], max_context=32, max_prefill=8, vocab_size=model.config.vocab_size)
    made = []

    class Recording(xnnpack_pieces.PieceLowerer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(executorch, "PieceLowerer", Recording)
    program = lower_to_pte(copy.deepcopy(model), meta)[0]
    return program, made[0]


@pytest.mark.parametrize("preset", ["int4", "fp32", "int4 Q4_1"])
def test_rebound_pieces_give_the_program_a_full_lowering_gives(monkeypatch, preset):
    model = random_model(tiny_config(num_layers=4), max_context=32)
    name, *carried = preset.split()
    model = apply_preset(model, get_preset(name), synthetic_blocks(model, carried[0]) if carried else None)
    rebound, with_rebinding = lowered(model, monkeypatch)
    unique = itertools.count()
    monkeypatch.setattr(xnnpack_pieces, "structure_key", lambda piece: str(next(unique)))  # nothing matches
    full, without = lowered(model, monkeypatch)
    assert without.rebound == 0 and without.lowered == with_rebinding.lowered + with_rebinding.rebound == 4 + 3
    # 4 layers: rope, the first layer's projections, 3 joins (one layer's end, the next one's start), the last
    # layer's end, the output layer. The joins are one structure: 2 of them rebound.
    assert with_rebinding.rebound == 2
    assert rebound == full


def test_structure_key_tells_apart_what_changes_a_graph():
    model = apply_preset(random_model(tiny_config(num_layers=3), max_context=32), get_preset("int4"))
    joins = executorch.XnnpackProgram(copy.deepcopy(model)).joins
    key = xnnpack_pieces.structure_key
    assert key(joins[0]) == key(joins[1])  # other weights, same graph
    changed = copy.deepcopy(joins[1])
    changed.output.post_attention_layernorm.eps = 1e-3  # a scalar in the graph
    assert key(changed) != key(joins[0])
    changed = copy.deepcopy(joins[1])
    changed.output.mlp.up_proj.scale = changed.output.mlp.up_proj.scale[:, :1].clone()  # another shape
    assert key(changed) != key(joins[0])


def test_a_piece_xnnpack_does_not_take_whole_is_refused():
    """Every piece must be one delegate: an op left outside would silently cost a delegate split per layer."""

    class Cumulative(torch.nn.Module):
        TOKEN_DIMS = (0,)

        def forward(self, x):
            return torch.cumsum(x * 2.0, dim=0)

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig

    lower = xnnpack_pieces.PieceLowerer(8, XnnpackPartitioner, EdgeCompileConfig(_check_ir_validity=False))
    with pytest.raises(RuntimeError, match="XNNPACK did not take all of Cumulative"):
        lower(Cumulative(), (torch.ones(3, 4),), Cumulative.TOKEN_DIMS)


def test_an_fp16_executorch_export_is_refused_before_loading():
    """XNNPACK takes no dtype cast, so an fp16 program's pieces would not be one delegate each: refused at once."""
    from edgepack.errors import EdgepackError

    with pytest.raises(EdgepackError, match="fp32 activations"):
        executorch._check_delegate(None, None, get_preset("fp16"))
    executorch._check_delegate(None, None, get_preset("int4"))  # the others pass
