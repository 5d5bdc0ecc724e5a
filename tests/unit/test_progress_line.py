"""The progress line as a log file shows it (issue 23, item 5): loss and throughput as means
over the logging interval, marked `_mean`, next to metrics.jsonl's per-step values (kept
under their old names); a wall-clock time and an ETA on every line, terminal or not; and
`skipped` printed as what it counts."""

import datetime
import json
import math

import pytest

from ov2_megatron.training.metrics import IntervalMeans, MetricsLogger


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _records(tmp_path) -> dict[int, dict]:
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_means_cover_the_steps_since_the_last_logged_step(tmp_path, capsys):
    """10 steps logged as the loop does (the first, then every 5th): the record of step 10
    holds step 10's own values and the means of steps 6-10, a skipped (NaN) step left out of
    the loss mean and its time kept in the rates."""
    losses = [5.0, 4.0, 3.5, 3.0, 2.9, 2.8, math.nan, 2.6, 2.5, 2.0]
    seconds = [9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 3.0]
    waits = [0.5, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.0, 0.0, 0.9]
    tokens = [640.0 + i for i in range(10)]
    logger = MetricsLogger(str(tmp_path), total_steps=10, enabled=True, clock=FakeClock())
    interval = IntervalMeans(model_flops_per_image_per_device=1e12, peak_flops=400e12)
    for step in range(1, 11):
        i = step - 1
        interval.add(losses[i], seconds[i], waits[i], 64, tokens[i])
        if step in (1, 5, 10):
            logger.log(step, dict(loss=losses[i], images_per_s=64 / seconds[i],
                                  data_wait_s=waits[i], skipped=1 if step >= 7 else 0,
                                  **interval.take()))
    logger.close()
    record = _records(tmp_path)[10]
    assert record["loss"] == 2.0 and record["images_per_s"] == 64 / 3.0  # the step's own
    assert record["interval_steps"] == 5
    assert record["loss_mean"] == pytest.approx((2.8 + 2.6 + 2.5 + 2.0) / 4, rel=1e-12)
    assert record["images_per_s_mean"] == pytest.approx(5 * 64 / 8.0, rel=1e-12)
    assert record["tokens_per_s_mean"] == pytest.approx(sum(tokens[5:]) / 8.0, rel=1e-12)
    assert record["tflops_per_device_mean"] == pytest.approx(40.0, rel=1e-12)  # 40 img/s
    assert record["mfu_mean"] == pytest.approx(0.1, rel=1e-12)
    assert record["data_wait_s_mean"] == pytest.approx(1.2 / 5, rel=1e-12)
    assert record["data_wait_fraction_mean"] == pytest.approx(1.2 / 8.0, rel=1e-12)
    assert record["step_s_mean"] == pytest.approx(8.0 / 5, rel=1e-12)
    assert _records(tmp_path)[5]["loss_mean"] == pytest.approx((4.0 + 3.5 + 3.0 + 2.9) / 4)
    first, _, last = capsys.readouterr().out.strip().splitlines()
    assert "| step 1/10 (means over step 1) | loss_mean 5.0000 | images_per_s_mean 7.1 |" \
        in first
    assert f"| step 10/10 (means over steps 6-10) | loss_mean {record['loss_mean']:.4f} |" \
        in last
    assert "| images_per_s_mean 40.0 | tokens_per_s_mean 404 | tflops_per_device_mean 40.00 | " \
           "mfu_mean 10.0% | data_wait_s_mean 0.240 | data_wait_fraction_mean 15.0% | " \
           "nonfinite_steps_skipped 1 | ETA 0:00:00" in last
    assert "| loss " not in last and "| skipped" not in last


def test_every_line_has_the_time_and_the_eta(tmp_path, capsys):
    """ETA = remaining steps x wall time per step since the first logged step; on that first
    line, the step's own time. Not a terminal (capsys): the line still has both."""
    clock = FakeClock(500.0)
    logger = MetricsLogger(str(tmp_path), total_steps=101, enabled=True, clock=clock)
    assert not logger.interactive
    logger.log(1, dict(loss=3.0, step_s_mean=5.0, interval_steps=1))  # 100 left x 5 s
    clock.now += 30.0
    logger.log(11, dict(loss=2.0, interval_steps=10))  # 30 s / 10 steps, 90 left: 270 s
    clock.now += 7.0
    logger.log(11, dict(val_loss=2.5))  # an evaluation after step 11: 37 s / 10 steps
    logger.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.rsplit(" | ", 1)[1] for line in lines] == ["ETA 0:08:20", "ETA 0:04:30",
                                                            "ETA 0:05:33"]
    assert logger.eta_seconds(11, {}) == pytest.approx(90 * 3.7)
    logger.total_steps = 1_000_000
    assert logger.eta_seconds(11, {}) == pytest.approx((1_000_000 - 11) * 3.7)
    for line in lines:
        stamp = datetime.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        assert abs((datetime.datetime.now() - stamp).total_seconds()) < 120


def test_a_long_eta_counts_days(tmp_path, capsys):
    clock = FakeClock()
    logger = MetricsLogger(str(tmp_path), total_steps=100_001, enabled=True, clock=clock)
    logger.log(1, dict(loss=1.0))
    assert capsys.readouterr().out.strip().endswith("| ETA unknown")  # nothing timed yet
    clock.now += 2.0
    logger.log(2, dict(loss=1.0))  # 2 s per step, 99,999 left: 199,998 s
    logger.close()
    assert capsys.readouterr().out.strip().endswith("| ETA 2d 7:33:18")
