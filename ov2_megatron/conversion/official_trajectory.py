"""Optimizer steps computed by the official OpenVision 2 code, as this framework's inputs.

A trajectory directory (like the shared fixture `openvision2_official_trajectory/`, see its
README) holds `meta.json` (geometry, the resolved official config, per-step losses),
`params0.npz` (the official initial flax parameters), `batches.npz` (per step `[step, ...]`:
normalised NHWC images, labels, autoreg_labels, cap_loss_mask, the drawn keep_idx) and
`official_mu_{fp32,bf16}.npz` (`step{k}/<param>`: the parameters after step k;
`per_step/{loss, lr, ...}`), the same run with Adam's first moment stored in fp32 or bf16.

Supported is the optimizer the official OpenVision 2 config resolves to: optax
`scale_by_adam` (b1, b2, eps), weight decay on the official mask multiplied by the LR
(decoupled: torch AdamW's step), no gradient clipping, and one schedule for every parameter:
linear warmup from 0 over `warmup_steps`, then cosine to `min_lr` at `total_steps`. That is
megatron's OptimizerParamScheduler with init_lr 0 and cosine decay exactly:
lr(s) = max_lr s / warmup for s <= warmup, else
min_lr + (max_lr - min_lr) (1 + cos(pi (s - warmup) / (total - warmup))) / 2.
Anything else is refused with a ConversionError naming the meta.json key, rather than
compared against a schedule or optimizer this framework does not run.

`compare_params` measures parameters after the steps against the official ones, relative to
the official update, without the attention KEY biases: their exact gradient is zero (softmax
is invariant to q.b_k), so Adam turns float noise there into steps of arbitrary sign in
either framework (up to ~4e-3 apart on the fixture, against ~2e-6 elsewhere).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ov2_megatron.config import ModelConfig, ParallelConfig, geometry
from ov2_megatron.conversion import ConversionError
from ov2_megatron.conversion.megatron_checkpoint import check_standard, standard_shapes
from ov2_megatron.conversion.official_case import caption_tokens, model_config, read_npz
from ov2_megatron.conversion.official_format import standard_from_flax

MOMENT_FILES = {"fp32": "official_mu_fp32.npz", "bf16": "official_mu_bf16.npz"}
BATCH_KEYS = ("images", "labels", "autoreg_labels", "cap_loss_mask", "keep_idx")
# optax.scale_by_adam's own defaults, for a config that leaves them out.
_ADAM_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}
# mu_dtype only chooses which reference file applies (MOMENT_FILES).
_ADAM_KEYS = set(_ADAM_DEFAULTS) | {"mu_dtype"}
_SCHEDULE_KEYS = {"decay_type", "warmup_steps", "min_lr", "max_lr"}


@dataclass(frozen=True)
class OfficialOptimizer:
    lr: float  # peak LR (config.lr = base_lr x batch / 256, already resolved)
    min_lr: float
    warmup_steps: int
    total_steps: int  # the schedule's length; the trajectory may stop earlier
    weight_decay: float  # multiplied by the LR, as optax add_decayed_weights + scale_by_lr
    beta1: float
    beta2: float
    eps: float


@dataclass
class StepBatch:
    images: torch.Tensor  # [b, c, H, W], normalised
    tokens: torch.Tensor  # [b, L] int64 (official_case's caption layout)
    keep_idx: torch.Tensor  # [b, k] int64, in the official drawn order


@dataclass
class OfficialTrajectory:
    model: ModelConfig
    optimizer: OfficialOptimizer
    start: dict[str, torch.Tensor]  # standard names: params0
    batches: list[StepBatch]  # one per official step
    losses: list[float]  # the official total loss per step (loss weight x caption loss)
    lrs: list[float]  # the LR the official step used
    final: dict[str, torch.Tensor]  # standard names: the parameters after the last step
    reference: str  # the file `losses`, `lrs` and `final` come from

    @property
    def batch_size(self) -> int:
        return self.batches[0].images.shape[0]


def load(directory: str, moment: str = "fp32") -> OfficialTrajectory:
    """Read and check a trajectory; `moment` picks the reference run (MOMENT_FILES).
    Raises ConversionError naming the file and key of anything missing or inconsistent."""
    reference = MOMENT_FILES[moment]
    files = ("meta.json", "params0.npz", "batches.npz", reference)
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise ConversionError(f"{directory}: not an official trajectory directory, missing "
                              f"{', '.join(missing)}")
    path = {name: os.path.join(directory, name) for name in files}
    try:
        with open(path["meta.json"]) as f:
            meta = json.load(f)
        steps = int(meta["steps"])
        model = model_config(meta, float(meta["config"]["coca_caption_loss_weight"]))
        optimizer = official_optimizer(meta)
        pad, batch = int(meta["PAD"]), int(meta["B"])
    except KeyError as error:
        raise ConversionError(f"{path['meta.json']}: missing key {error}") from None
    except ValueError as error:  # not JSON, or a value of the wrong type
        raise ConversionError(f"{path['meta.json']}: {error}") from None
    except ConversionError as error:
        raise ConversionError(f"{path['meta.json']}: {error}") from None
    geom = geometry(model, ParallelConfig())
    if int(meta.get("num_kept", geom.num_kept)) != geom.num_kept:
        raise ConversionError(f"{path['meta.json']}: num_kept {meta['num_kept']}, but keep_ratio "
                              f"{meta['keep_ratio']} of {geom.num_patches} patches keeps "
                              f"{geom.num_kept}")
    params0 = read_npz(path["params0.npz"])
    try:
        start = standard_from_flax(params0)
    except ConversionError as error:
        raise ConversionError(f"{path['params0.npz']}: {error}") from None
    check_standard(start, standard_shapes(model, geom), path["params0.npz"])
    batches = _batches(read_npz(path["batches.npz"]), model, (steps, batch), geom, pad,
                       path["batches.npz"])
    official = read_npz(path[reference])
    return OfficialTrajectory(
        model, optimizer, start, batches,
        losses=_per_step(official, "loss", steps, path[reference]),
        lrs=_per_step(official, "lr", steps, path[reference]),
        final=_params_after(official, steps, list(params0), path[reference]),
        reference=reference)


def official_optimizer(meta: dict) -> OfficialOptimizer:
    """The optimizer and schedule of meta.json's `config`, refusing what this framework does
    not run the same way (module docstring)."""
    config = meta["config"]
    _require(config.get("optax_name") == "scale_by_adam", "config.optax_name",
             config.get("optax_name"), "only scale_by_adam (Adam) is supported")
    adam = config.get("optax") or {}
    for key in sorted(set(adam) - _ADAM_KEYS):
        _require(False, f"config.optax.{key}", adam[key], "unsupported Adam option")
    for key in ("grad_clip_norm", "wd_mults"):
        _require(config.get(key) is None, f"config.{key}", config.get(key),
                 "only the official recipe's unset value (null) is supported")
    schedule = _one_schedule(config["schedule"])
    total, warmup = int(meta["total_steps"]), int(schedule.get("warmup_steps", 0))
    _require(schedule.get("decay_type") == "cosine", "config.schedule decay_type",
             schedule.get("decay_type"), "only cosine decay with linear warmup is supported")
    _require(float(schedule.get("max_lr", config["lr"])) == float(config["lr"]),
             "config.schedule max_lr", schedule.get("max_lr"), "differs from config.lr")
    # megatron's scheduler needs the warmup to end before the decay does (and the trainer
    # replaces a longer one: run_config.effective_warmup).
    _require(0 <= warmup < total, "config.schedule warmup_steps", warmup,
             f"must lie in [0, total_steps {total})")
    return OfficialOptimizer(
        lr=float(config["lr"]), min_lr=float(schedule.get("min_lr", 0.0)), warmup_steps=warmup,
        total_steps=total, weight_decay=float(config["wd"]),
        **{name: float(adam.get(key, default)) for name, (key, default) in
           zip(("beta1", "beta2", "eps"), _ADAM_DEFAULTS.items())})


def _one_schedule(schedule) -> dict:
    """The official schedule is a list of [parameter regex, settings]: one entry for all."""
    ok = (isinstance(schedule, list) and len(schedule) == 1 and schedule[0][0] == ".*"
          and isinstance(schedule[0][1], dict))
    _require(ok, "config.schedule", schedule, "only one schedule for every parameter ('.*')")
    settings = schedule[0][1]
    for key in sorted(set(settings) - _SCHEDULE_KEYS):
        _require(False, f"config.schedule {key}", settings[key], "unsupported schedule setting")
    return settings


def _require(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConversionError(f"{key} = {value!r}: {why}")


def _batches(arrays: dict, model: ModelConfig, steps_and_batch: tuple[int, int], geom,
             pad: int, where: str) -> list[StepBatch]:
    missing = [key for key in BATCH_KEYS if key not in arrays]
    if missing:
        raise ConversionError(f"{where}: missing key {', '.join(missing)}")
    steps, b = steps_and_batch
    res, length = model.vision.image_size, model.decoder.caption_length
    shapes = {"images": (steps, b, res, res, 3), "labels": (steps, b, length),
              "autoreg_labels": (steps, b, length - 1), "cap_loss_mask": (steps, b, length - 1),
              "keep_idx": (steps, b, geom.num_kept)}
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise ConversionError(f"{where}: {key} has shape {arrays[key].shape}, meta.json's "
                                  f"geometry needs {shape} (steps, B, ...; {geom.num_kept} of "
                                  f"{geom.num_patches} patches kept)")
    keep = arrays["keep_idx"].astype(np.int64)
    if keep.min() < 0 or keep.max() >= geom.num_patches:
        raise ConversionError(f"{where}: keep_idx outside [0, {geom.num_patches}) patches")
    out = []
    for step in range(steps):
        images = arrays["images"][step].transpose(0, 3, 1, 2)  # NHWC -> [b, c, H, W]
        tokens = caption_tokens({key: arrays[key][step] for key in BATCH_KEYS}, pad,
                                f"{where} step {step + 1}")
        out.append(StepBatch(torch.from_numpy(np.ascontiguousarray(images)).float(), tokens,
                             torch.from_numpy(keep[step])))
    return out


def _per_step(official: dict, key: str, steps: int, where: str) -> list[float]:
    values = official.get(f"per_step/{key}")
    if values is None or len(values) < steps:
        raise ConversionError(f"{where}: missing key per_step/{key} (one value per step, "
                              f"{steps} steps)")
    return [float(v) for v in values[:steps]]


def _params_after(official: dict, steps: int, names: list[str],
                  where: str) -> dict[str, torch.Tensor]:
    """The parameters after the last step, under params0.npz's names."""
    prefix = f"step{steps}/"
    missing = [prefix + name for name in names if prefix + name not in official]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{where}: missing key {missing[0]}{more}")
    return standard_from_flax({name: official[prefix + name] for name in names})


def is_key_bias(name: str) -> bool:
    """A qkv bias (standard name): its key rows are left out of compare_params."""
    return name.endswith(".attn.qkv.bias")


def _compared(name: str, tensor):
    """The elements compared: a qkv bias ([q; k; v] rows, standard layout) without its key
    rows, whose exact gradient is zero (softmax is invariant to q.b_k)."""
    flat = tensor.double().flatten()
    if not is_key_bias(name):
        return flat
    width = flat.numel() // 3
    return torch.cat([flat[:width], flat[2 * width:]])


def compare_params(start: dict, official: dict, ours: dict) -> tuple[float, str, float]:
    """(global rel L2, worst tensor's name, its rel) of our parameters after the steps
    against the official ones, both relative to the official update (official - start). A
    tensor the official steps left unchanged is measured in absolute terms."""
    missing = sorted(set(official) ^ set(ours))
    if missing:
        raise ValueError(f"parameters without a counterpart: {missing[:8]}")
    diff_sq = update_sq = 0.0
    worst_name, worst = "", 0.0
    for name in sorted(official):
        want = _compared(name, official[name])
        diff = _compared(name, ours[name]) - want
        update = want - _compared(name, start[name])
        diff_sq, update_sq = diff_sq + float(diff @ diff), update_sq + float(update @ update)
        scale, err = float(update.abs().max()), float(diff.abs().max())
        rel = err / scale if scale > 0 else err
        if rel >= worst:
            worst_name, worst = name, rel
    return (diff_sq / update_sq) ** 0.5 if update_sq else diff_sq ** 0.5, worst_name, worst
