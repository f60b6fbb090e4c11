"""benchmark/profile_generation.py's summary over rounds: medians of cells and of per-round ratios."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "profile_generation", Path(__file__).parents[1] / "benchmark" / "profile_generation.py"
)
pg = importlib.util.module_from_spec(_spec)
sys.modules["profile_generation"] = pg  # its dataclasses look their module up
_spec.loader.exec_module(pg)


def cell(backend: str, batch: int, tok_s: float) -> "pg.Cell":
    return pg.Cell(backend, batch, 64, 128, 0.0, 0.0, tok_s, 0.0)


def test_summary_takes_medians_of_cells_and_of_per_round_ratios():
    rounds = [
        [cell("pytorch", 8, 300.0), cell("hf (float32)", 8, 100.0)],
        [cell("pytorch", 8, 200.0), cell("hf (float32)", 8, 50.0)],  # ratio 4.0: slow round for both
        [cell("pytorch", 8, 270.0), cell("hf (float32)", 8, 60.0)],  # ratio 4.5
    ]
    rows = {r.split("|")[1].strip(): r for r in pg.summary(rounds).splitlines()[2:]}
    assert "| 270.0 (200.0-300.0) |" in rows["pytorch"]
    # the median of the rounds' ratios (3.0, 4.0, 4.5), not the ratio of the medians (270 / 60 = 4.5)
    assert "4.00 (3.00-4.50)x" in rows["pytorch"]
    assert rows["hf (float32)"].endswith("| |")


@pytest.mark.parametrize("argv", [["--repeat", "2"], []])
def test_repeat_flag(argv):
    assert pg.parse_args(argv).repeat == (2 if argv else 1)
