"""Each distinct layer graph is lowered to XNNPACK once (`exporters/xnnpack_reuse.py`): the program must be the one a
full lowering of every delegate writes, byte for byte, and layers must in fact be reused."""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager

import pytest

from edgepack.exporters import executorch, xnnpack_reuse
from edgepack.exporters.executorch import Metadata, lower_to_pte
from edgepack.quantize import apply_preset, get_preset

from conftest import random_model, tiny_config


def lowered(model, monkeypatch) -> tuple[bytes, xnnpack_reuse.ReuseCounts]:
    """The program's bytes and the counts of delegates lowered and reused."""
    meta = Metadata(bos_id=1, eos_ids=[2], max_context=32, max_prefill=8, vocab_size=model.config.vocab_size)
    counts = []
    reuse = xnnpack_reuse.reuse_lowered_layers

    @contextmanager
    def counting(on_delegate):
        with reuse(on_delegate) as found:
            counts.append(found)
            yield found

    monkeypatch.setattr(executorch, "reuse_lowered_layers", counting)
    program = lower_to_pte(copy.deepcopy(model), meta)[0]
    return program, counts[0]


@pytest.mark.parametrize("preset", ["int4", "fp32"])
def test_reused_layers_give_the_program_a_full_lowering_gives(monkeypatch, preset):
    model = random_model(tiny_config(num_layers=4), max_context=32)
    model = apply_preset(model, get_preset(preset))
    reused, with_reuse = lowered(model, monkeypatch)
    unique = itertools.count()
    monkeypatch.setattr(xnnpack_reuse, "graph_signature", lambda program: str(next(unique)))  # nothing matches
    full, without = lowered(model, monkeypatch)
    assert without.reused == 0 and with_reuse.lowered + with_reuse.reused == without.lowered
    # 4 layers: the delegates between attention ops span the end of one layer and the start of the next; the
    # middle ones are the same graph.
    assert with_reuse.reused >= 2
    assert reused == full


def test_a_graph_whose_passes_change_a_weight_is_not_reused():
    """The check that guards reuse: a transformed program holding another tensor than the original is refused."""
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4, 4))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight)

    program = torch.export.export(Scaled(), (torch.ones(2, 4),))
    assert xnnpack_reuse.reusable(program, program) is not None
    changed = copy.copy(program)
    changed._state_dict = {name: tensor.clone() for name, tensor in program.state_dict.items()}
    assert xnnpack_reuse.reusable(program, changed) is None
