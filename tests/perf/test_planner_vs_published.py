"""The planner against runs published by others: every row of
docs/benchmarks/planner_vs_published.md is recomputed from ov2_megatron/perf/published_runs.py;
a change to the time model that moves a prediction fails here until the table (and the doc)
are updated on purpose."""

import re
from pathlib import Path

import pytest

from ov2_megatron.perf.published_runs import BAND, RUNS

DOC = Path(__file__).resolve().parents[2] / "docs/benchmarks/planner_vs_published.md"


def _doc_rows() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 5 and any(cells[0] == r.name for r in RUNS):
            rows[cells[0]] = cells
    return rows


def test_at_least_eight_runs_from_at_least_three_sources():
    assert len(RUNS) >= 8
    assert len({r.source for r in RUNS}) >= 3
    assert all(r.source.startswith("https://") for r in RUNS)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.name)
def test_prediction_equals_the_pinned_value(run):
    assert run.predict().per_gpu == pytest.approx(run.pinned_per_gpu, rel=1e-3)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.name)
def test_ratio_band(run):
    inside = abs(run.ratio - 1) <= BAND
    assert inside == (not run.outside_band), (
        f"{run.name}: ratio {run.ratio:.2f}; rows outside +-{BAND:.0%} must say why "
        "(outside_band) and rows inside must not")


def test_doc_table_matches_the_pinned_values():
    rows = _doc_rows()
    assert set(rows) == {r.name for r in RUNS}
    for run in RUNS:
        numbers = [float(x.replace(",", "")) for x in re.findall(r"[\d,]+\.?\d*",
                                                                 " ".join(rows[run.name][-3:]))]
        published, predicted, ratio = numbers[-3:]
        assert published == pytest.approx(run.published_per_gpu, rel=2e-3), run.name
        assert predicted == pytest.approx(run.pinned_per_gpu, rel=2e-3), run.name
        assert ratio == pytest.approx(run.ratio, abs=0.006), run.name
