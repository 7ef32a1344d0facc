"""A delegate graph seen before replays its transformed graph over its own weights (`exporters/xnnpack_reuse.py`); the
programs this gives are checked byte for byte in tests/test_xnnpack_pieces.py. Here: the guard that keeps it exact."""

from __future__ import annotations

import copy

from edgepack.exporters import xnnpack_reuse


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
