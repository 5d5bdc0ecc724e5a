"""The share of step time spent waiting for data (issue 16, item 5): `data_wait_fraction` in
the progress line and metrics.jsonl, and DataWaitMonitor's warning, which fires once per
window above train.data_wait_warn_fraction and never at or below it."""

import json

import pytest

from ov2_megatron.recipes import get_recipe
from ov2_megatron.training.metrics import DataWaitMonitor, MetricsLogger, data_wait_fraction
from ov2_megatron.training.run_config import apply_overrides, validate_run


def _feed(monitor, waits, step_s=1.0):
    """Each step of 1 s waits waits[i] s; returns {step: warning} for the steps that warn."""
    out = {}
    for step, wait in enumerate(waits, 1):
        warning = monitor.update(step, wait, step_s)
        if warning:
            out[step] = warning
    return out


def test_fraction_is_the_share_of_the_step():
    assert data_wait_fraction(0.25, 1.0) == 0.25
    assert data_wait_fraction(0.0, 0.0) == 0.0  # no division by a zero-length step


def test_warns_once_per_window_above_the_limit_only():
    monitor = DataWaitMonitor(window=4, warn_fraction=0.1)
    # windows: steps 1-4 at 5% (quiet), 5-8 at 20% (warns at 8), 9-12 at 10% exactly (quiet:
    # the limit is not exceeded), 13-16 at 11% (warns at 16)
    waits = [0.05] * 4 + [0.2] * 4 + [0.1] * 4 + [0.11] * 4
    warnings = _feed(monitor, waits)
    assert sorted(warnings) == [8, 16]
    assert "steps 5-8 spent 20% of their time waiting" in warnings[8]
    assert "steps 13-16 spent 11%" in warnings[16]
    for fix in ("data.num_threads", "DALI GPU decoding", "tools/prepare_shards.py --resize",
                "more CPU cores"):
        assert fix in warnings[8]


def test_a_single_long_wait_counts_by_its_time():
    """The share is total wait / total time: one 3 s stall in a window of 1 s steps."""
    monitor = DataWaitMonitor(window=3, warn_fraction=0.5)
    assert monitor.update(1, 0.0, 1.0) is None and monitor.update(2, 0.0, 1.0) is None
    warning = monitor.update(3, 3.0, 4.0)  # (0 + 0 + 3) / (1 + 1 + 4) = 50%: not above
    assert warning is None
    assert _feed(monitor, [0.0, 0.0, 0.0]) == {}
    monitor = DataWaitMonitor(window=3, warn_fraction=0.49)
    assert monitor.update(1, 0.0, 1.0) is None and monitor.update(2, 0.0, 1.0) is None
    assert "50%" in monitor.update(3, 3.0, 4.0)


def test_logger_prints_the_fraction_and_the_warning(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), total_steps=4, enabled=True,
                           data_wait=DataWaitMonitor(window=2, warn_fraction=0.1))
    for step in (1, 2):
        logger.watch_data_wait(step, 0.5, 1.0)
    logger.log(2, dict(loss=1.0, data_wait_s=0.5, data_wait_fraction=0.5))
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warning: steps 1-2 spent 50% of their time waiting for data")
    assert "data_wait_s 0.500 | data_wait_fraction 50.0%" in out[1]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["data_wait_fraction"] == 0.5


def test_logger_on_other_ranks_stays_silent(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), total_steps=2, enabled=False,
                           data_wait=DataWaitMonitor(window=1, warn_fraction=0.1))
    logger.watch_data_wait(1, 1.0, 1.0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("override,message", [
    ("train.data_wait_window=0", "train.data_wait_window 0 must be >= 1"),
    ("train.data_wait_warn_fraction=0", "train.data_wait_warn_fraction 0.0 must be in (0, 1]"),
    ("train.data_wait_warn_fraction=1.5", "train.data_wait_warn_fraction 1.5 must be in (0, 1]"),
])
def test_bad_settings_name_the_field(tmp_path, override, message):
    run = apply_overrides(get_recipe("tiny_cpu"), [f"train.output_dir={tmp_path}", override])
    with pytest.raises(ValueError) as info:
        validate_run(run, 1)
    assert message in str(info.value)
