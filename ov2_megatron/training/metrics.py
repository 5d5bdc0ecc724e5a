"""One metrics line per logging step, metrics.jsonl, TensorBoard, and a progress bar with
ETA on interactive terminals. Only the logging rank (global rank 0) writes.

A dict value (the loader's replaced samples by reason, `bad_samples`) is logged as its total
under its own name plus one metric per entry (`bad_samples/no_caption`), and printed as
`bad_samples 109 (undecodable 100, no_caption 9)`: `skipped` counts non-finite steps only.

`data_wait_fraction` is the share of the step spent waiting for the batch; DataWaitMonitor
prints a warning with the likely fixes when, over a window of steps, that share stays above
train.data_wait_warn_fraction."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsLogger:
    """`resumed_at`: the step training starts from (0, or the checkpoint's). Records of later
    steps, written by a run that stopped after its last checkpoint, are dropped from
    metrics.jsonl and purged from TensorBoard, so each step is logged once."""

    def __init__(self, run_dir: str, total_steps: int, enabled: bool,
                 data_wait: DataWaitMonitor | None = None, resumed_at: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.data_wait = data_wait
        self.interactive = enabled and sys.stdout.isatty()
        self._start, self._start_step = time.monotonic(), None
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "metrics.jsonl")
            _drop_records_after(path, resumed_at)
            self._jsonl = open(path, "a", buffering=1)
            # TensorBoard hides the events of steps >= purge_step written before this point.
            self._writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                         purge_step=resumed_at + 1)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self._start_step is None:
            self._start_step, self._start = step - 1, time.monotonic()
        record = {"step": step}
        for key, value in values.items():
            record.update(_flatten(key, value))
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()
        self._print(step, record)

    def watch_data_wait(self, step: int, data_wait_s: float, step_s: float) -> None:
        """Every step: feed the data-wait monitor; print (and keep in TensorBoard) its warning."""
        if not (self.enabled and self.data_wait):
            return
        warning = self.data_wait.update(step, data_wait_s, step_s)
        if warning:
            print(warning, flush=True)
            self.text("warnings/data_wait", warning, step)

    def _print(self, step: int, record: dict) -> None:
        fields = [f"step {step}/{self.total_steps}"]
        for key, fmt in (("loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"),
                         ("images_per_s", ".1f"), ("tokens_per_s", ".0f"),
                         ("tflops_per_device", ".2f"), ("mfu", ".1%"), ("data_wait_s", ".3f"),
                         ("data_wait_fraction", ".1%"),
                         ("memory_gb", ".2f"), ("skipped", "d"), ("val_loss", ".4f"),
                         ("val_token_accuracy", ".1%"), ("val_loss_wrong_images", ".4f"), ("probe_shape_accuracy", ".1%"),
                         ("probe_colour_accuracy", ".1%")):
            value = record.get(key)
            if value is not None:
                fields.append(f"{key} {format(value, fmt)}")
        if record.get("bad_samples"):
            fields.append(_breakdown("bad_samples", record))
        line = " | ".join(fields)
        if self.interactive:
            line = f"{self._bar(step)} {line} | ETA {self._eta(step)}"
        print(line, flush=True)

    def _bar(self, step: int, width: int = 20) -> str:
        done = int(width * step / max(self.total_steps, 1))
        return "[" + "#" * done + "." * (width - done) + "]"

    def _eta(self, step: int) -> str:
        elapsed = time.monotonic() - self._start
        per_step = elapsed / max(step - self._start_step, 1)
        seconds = int(per_step * (self.total_steps - step))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)
            self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._writer.close()


def data_wait_fraction(data_wait_s: float, step_s: float) -> float:
    """Share of a step spent waiting for its batch; step_s includes the wait (loop.py)."""
    return data_wait_s / step_s if step_s > 0 else 0.0


def _drop_records_after(path: str, step: int) -> None:
    """Keep the records of steps <= `step` (a line cut by a crash goes too); replaced
    atomically, untouched when nothing is dropped."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class DataWaitMonitor:
    """Whether the input pipeline holds training back: the share of wall time spent waiting
    for data over each window of `window` steps (total wait / total step time, so a slow step
    weighs as much as it costs). Checked once per window, so a run that stays input-bound
    warns once per window, not at every step."""

    def __init__(self, window: int, warn_fraction: float):
        self.window, self.warn_fraction = window, warn_fraction
        self._wait = self._time = 0.0
        self._steps = 0

    def update(self, step: int, data_wait_s: float, step_s: float) -> str | None:
        """Add one step; at the end of a window, the warning if its share is over the limit."""
        self._wait, self._time, self._steps = (self._wait + data_wait_s, self._time + step_s,
                                               self._steps + 1)
        if self._steps < self.window:
            return None
        share = data_wait_fraction(self._wait, self._time)
        self._wait = self._time = 0.0
        self._steps = 0
        if share <= self.warn_fraction:
            return None
        return (f"warning: steps {step - self.window + 1}-{step} spent {share:.0%} of their "
                f"time waiting for data (more than train.data_wait_warn_fraction "
                f"{self.warn_fraction:.0%}): the input pipeline does not keep up. Likely fixes:"
                " more decode threads (data.num_threads), DALI GPU decoding (data.hw_decoder_load"
                " for the hardware JPEG engines), a stage-1 copy of the shards resized to the "
                "training resolution (tools/prepare_shards.py --resize), or more CPU cores per "
                "GPU; tools/plan.py states the images/s per node a layout needs")


def _flatten(key: str, value) -> dict:
    """{key: value}, or for a dict {key: sum, key/name: count, ...}."""
    if not isinstance(value, dict):
        return {key: _plain(value)}
    parts = {f"{key}/{name}": _plain(count) for name, count in sorted(value.items())}
    return {key: sum(parts.values()), **parts}


def _breakdown(key: str, record: dict) -> str:
    """"bad_samples 109 (undecodable 100, no_caption 9)", largest reason first."""
    prefix = key + "/"
    parts = sorted(((k[len(prefix):], v) for k, v in record.items() if k.startswith(prefix)),
                   key=lambda kv: -kv[1])
    detail = ", ".join(f"{name} {count}" for name, count in parts)
    return f"{key} {record[key]}" + (f" ({detail})" if detail else "")


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value
