"""Progress as a user sees it: in a log (not a terminal) one line when a stage starts and one when it ends,
written at once; counted stages (layers, delegates) are advanced by the pipeline once per unit."""

from __future__ import annotations

from edgepack.model import build_model, model_pieces, piece_count
from edgepack.output import Output
from edgepack.progress import Steps

from conftest import random_model, tiny_config


class Recorder(Steps):
    def __init__(self) -> None:
        self.stages: list[list] = []

    def __call__(self, name: str, total: int | None = None) -> None:
        self.stages.append([name, total, 0])

    def advance(self, units: int = 1) -> None:
        self.stages[-1][2] += units


def test_logged_steps_print_each_stage_as_it_starts_and_ends(capfd):
    out = Output(as_json=False)
    with out.steps("export") as step:
        step("load model")
        step("quantize, by layer", total=2)
        step.advance()
        step.advance()
    lines = [line.strip() for line in capfd.readouterr().err.splitlines()]
    assert lines[0] == "… export: load model"
    assert lines[1].startswith("✓ load model (")
    assert lines[2] == "… export: quantize, by layer (2 units)"
    assert lines[3].startswith("✓ quantize, by layer (")


def test_a_failed_stage_is_marked(capfd):
    out = Output(as_json=False)
    try:
        with out.steps("export") as step:
            step("lower")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert capfd.readouterr().err.splitlines()[-1].strip().startswith("✗ lower (")


def test_building_a_model_advances_once_per_piece():
    cfg = tiny_config()
    weights = random_model(cfg, max_context=16).state_dict()
    recorder = Recorder()
    recorder("quantize", total=piece_count(cfg))
    model = build_model(cfg, weights, 16, on_piece=recorder.advance)
    assert recorder.stages == [["quantize", cfg.num_layers + 3, len(model_pieces(model))]]
    assert piece_count(cfg) == len(model_pieces(model))
