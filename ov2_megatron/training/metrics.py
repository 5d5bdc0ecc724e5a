"""One metrics line per logging step, metrics.jsonl, TensorBoard, and a progress bar on
interactive terminals. Only the logging rank (global rank 0) writes.

The printed line, terminal or log file alike, starts with the wall-clock time and ends with
the ETA. Loss and throughput are printed as means over the logging interval, marked by their
`_mean` names and the interval after the step (`step 20/100 (means over steps 11-20) |
loss_mean 2.4012 | images_per_s_mean 93.8 | ...`): one step's loss is noise, and a log
every 10 steps would otherwise show one step in ten. metrics.jsonl keeps the logged step's
own values under the plain names (`loss`, `images_per_s`, ...) and adds the means as
`<name>_mean` with `interval_steps`, the number of steps they average (IntervalMeans).

A dict value (the loader's replaced samples by reason, `bad_samples`) is logged as its total
under its own name plus one metric per entry (`bad_samples/no_caption`), and printed as
`bad_samples 109 (undecodable 100, no_caption 9)`. `skipped` (metrics.jsonl) counts the
optimizer steps skipped for a non-finite loss since this process started; the line prints it
as `nonfinite_steps_skipped`, which says so next to bad_samples.

`data_wait_fraction` is the share of the step spent waiting for the batch; DataWaitMonitor
prints a warning with the likely fixes when, over a window of steps, that share stays above
train.data_wait_warn_fraction."""

from __future__ import annotations

import json
import math
import os
import sys
import time


# Printed in this order; a key's `<key>_mean` (IntervalMeans) takes its place when present.
PRINTED = (("loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"), ("images_per_s", ".1f"),
           ("tokens_per_s", ".0f"), ("tflops_per_device", ".2f"), ("mfu", ".1%"),
           ("data_wait_s", ".3f"), ("data_wait_fraction", ".1%"), ("memory_gb", ".2f"),
           ("skipped", "d"), ("val_loss", ".4f"), ("val_token_accuracy", ".1%"),
           ("val_loss_wrong_images", ".4f"), ("probe_shape_accuracy", ".1%"),
           ("probe_colour_accuracy", ".1%"))
# metrics.jsonl's names, kept for its readers; the line says what they count.
PRINTED_NAMES = {"skipped": "nonfinite_steps_skipped"}


class MetricsLogger:
    """`resumed_at`: the step training starts from (0, or the checkpoint's). Records of later
    steps, written by a run that stopped after its last checkpoint, are dropped from
    metrics.jsonl and purged from TensorBoard, so each step is logged once. `clock`: the
    monotonic clock the ETA is measured with (a test passes its own)."""

    def __init__(self, run_dir: str, total_steps: int, enabled: bool,
                 data_wait: DataWaitMonitor | None = None, resumed_at: int = 0,
                 clock=time.monotonic):
        self.enabled, self.total_steps = enabled, total_steps
        self.data_wait = data_wait
        self.interactive = enabled and sys.stdout.isatty()
        self._clock = clock
        self._first: tuple[int, float] | None = None  # (first logged step, its time)
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
        if self._first is None:
            self._first = (step, self._clock())
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
        fields = [time.strftime("%Y-%m-%d %H:%M:%S %Z"), _step_field(step, self.total_steps,
                                                                      record)]
        for key, fmt in PRINTED:
            name = f"{key}_mean" if record.get(f"{key}_mean") is not None else key
            value = record.get(name)
            if value is not None:
                fields.append(f"{PRINTED_NAMES.get(name, name)} {format(value, fmt)}")
        if record.get("bad_samples"):
            fields.append(_breakdown("bad_samples", record))
        fields.append(f"ETA {_duration(self.eta_seconds(step, record))}")
        line = " | ".join(fields)
        if self.interactive:
            line = f"{self._bar(step)} {line}"
        print(line, flush=True)

    def _bar(self, step: int, width: int = 20) -> str:
        done = int(width * step / max(self.total_steps, 1))
        return "[" + "#" * done + "." * (width - done) + "]"

    def eta_seconds(self, step: int, record: dict) -> float | None:
        """Remaining steps x the wall time per step since the first logged step (evaluation
        and checkpoints included: they are part of what is left). The first logged step's
        own time is left out, as it carries the start-up (compilation, allocator warm-up);
        on that first line the step's own time (`step_s_mean`) is all there is."""
        first_step, first_time = self._first
        if step > first_step:
            per_step = (self._clock() - first_time) / (step - first_step)
        else:
            per_step = record.get("step_s_mean")
        if per_step is None:
            return None
        return per_step * max(self.total_steps - step, 0)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)
            self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._writer.close()


class IntervalMeans:
    """Per-step values summed since the last logged step, for the `_mean` fields of the next
    record (`take`). The loss is averaged over the steps whose loss was finite (a skipped
    step's is not a loss); rates are totals over time (images / seconds, so a slow step
    weighs what it cost, as in DataWaitMonitor), and model TFLOP/s and MFU follow from that
    images/s as the per-step ones do (loop.py)."""

    def __init__(self, model_flops_per_image_per_device: float = 0.0,
                 peak_flops: float | None = None):
        self.flops, self.peak = model_flops_per_image_per_device, peak_flops
        self._clear()

    def _clear(self) -> None:
        self.steps = self.finite_steps = 0
        self.loss = self.seconds = self.data_wait_s = self.images = self.tokens = 0.0

    def add(self, loss: float, step_s: float, data_wait_s: float, images: int,
            tokens: float) -> None:
        """One step: its loss, its wall time including the data wait, the wait, its sizes."""
        self.steps += 1
        if math.isfinite(loss):
            self.loss, self.finite_steps = self.loss + loss, self.finite_steps + 1
        self.seconds += step_s
        self.data_wait_s += data_wait_s
        self.images += images
        self.tokens += tokens

    def take(self) -> dict:
        """The means since the last take (empty if no step was added), then start over."""
        if not self.steps:
            return {}
        seconds = max(self.seconds, 1e-12)
        images_per_s = self.images / seconds
        tflops = self.flops * images_per_s / 1e12
        means = dict(interval_steps=self.steps, step_s_mean=self.seconds / self.steps,
                     loss_mean=self.loss / self.finite_steps if self.finite_steps else None,
                     images_per_s_mean=images_per_s, tokens_per_s_mean=self.tokens / seconds,
                     tflops_per_device_mean=tflops,
                     mfu_mean=tflops * 1e12 / self.peak if self.peak else None,
                     data_wait_s_mean=self.data_wait_s / self.steps,
                     data_wait_fraction_mean=data_wait_fraction(self.data_wait_s, self.seconds))
        self._clear()
        return means


def _step_field(step: int, total_steps: int, record: dict) -> str:
    """"step 20/100", and the steps the record's `_mean` values cover."""
    field = f"step {step}/{total_steps}"
    steps = record.get("interval_steps")
    if steps == 1:
        return f"{field} (means over step {step})"
    if steps:
        return f"{field} (means over steps {step - steps + 1}-{step})"
    return field


def _duration(seconds: float | None) -> str:
    """"0:04:12", "3d 2:00:05"; "unknown" before anything was timed."""
    if seconds is None:
        return "unknown"
    whole = int(seconds)
    days, clock = divmod(whole, 86400)
    text = f"{clock // 3600}:{clock // 60 % 60:02d}:{clock % 60:02d}"
    return f"{days}d {text}" if days else text


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
