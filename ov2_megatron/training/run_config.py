"""The run configuration: model + parallel layout + data + training, `--set` overrides, and
the validation every run passes before any compute (`validate_run`)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

from ov2_megatron.config import (ModelConfig, ParallelConfig, SequenceGeometry, check_minimums,
                                 validate_model, validate_parallel)
from ov2_megatron.data.config import DataConfig


@dataclass
class TrainConfig:
    samples: int | None = None
    """Images this stage trains on, the official way to give a length: steps = samples //
    global_batch (floored, as the official config), so a changed global batch keeps the
    images seen. One of train.samples / train.steps is set; a --set of one unsets the other."""
    steps: int | None = 1000
    """Optimizer steps, for a length given in steps (smoke tests, benchmarks)."""
    global_batch: int = 256
    """Images per optimizer step over all data-parallel replicas."""
    micro_batch: int = 8
    """Images per forward/backward on one replica (gradient accumulation fills the rest)."""
    base_lr: float | None = None
    """Peak learning rate per 256 images, the official rule: lr = base_lr x global_batch /
    256, so the LR follows a changed global batch. One of train.base_lr / train.lr is set; a
    --set of one unsets the other."""
    lr: float | None = 1e-3
    """Peak learning rate as given, whatever the global batch."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_samples: int | None = None
    """Linear warmup from 0 to the peak LR over this many images (warmup steps =
    warmup_samples // global_batch, as the official config). One of train.warmup_samples /
    warmup_steps / warmup_fraction is set; a --set of one unsets the others."""
    warmup_steps: int | None = 100
    """Linear warmup steps from 0 to lr, absolute: the same whatever train.steps. Only a run
    too short to hold its warmup (steps <= warmup, e.g. a smoke test) warms up over its first
    tenth instead, and the start line and --dry-run say so."""
    warmup_fraction: float | None = None
    """Warmup as a fraction of the run's steps (e.g. 0.05), for a warmup that scales with the
    run. The start line says which rule gave the warmup."""
    weight_decay: float = 0.2
    """Decoupled weight decay, multiplied by the LR, on the official mask: Dense and Conv
    weights only (models/parameter_kinds.py; --dry-run lists it)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 0.0
    """Global gradient-norm clip; 0 (the official recipe) clips nothing."""
    precision: str = "bf16"
    """'bf16' (mixed precision, fp32 master weights) or 'fp32'."""
    recompute: str = "none"
    """Activation recomputation: 'none', 'selective' (attention core) or 'full' (each layer)."""
    seed: int = 1234
    """Seeds init, token dropping and data order."""
    resume_data_stream: bool = True
    """On resume, continue the data stream exactly where the checkpoint left it (on another
    data-parallel size too: data/replica_stream.py). False starts a fresh stream (samples
    already seen are seen again): for a checkpoint whose stream cannot continue here
    (another shard list, loader version, or a global batch the kept streams cannot split)."""
    overlap_grad_reduce: bool | None = None
    """Reduce-scatter gradient buckets during the backward pass, as each bucket's last
    gradient arrives, instead of after it (megatron DDP; buckets of megatron's default
    max(40M, 1M x DP) elements). None: on where CUDA is."""
    overlap_param_gather: bool | None = None
    """All-gather the updated weights bucket by bucket during the next forward pass instead
    of inside optimizer.step (distributed optimizer; needs overlap_grad_reduce). Checkpoints
    and evaluation force the gather first. None: on where CUDA is."""
    output_dir: str = "runs/default"
    """Run directory: config.json, metrics.jsonl, TensorBoard events, checkpoints/."""
    init_from: str = ""
    """Stage 2: checkpoint (run or checkpoint dir) of stage 1; weights only, fresh schedule."""
    log_interval: int = 10
    data_wait_window: int = 50
    """Steps over which the share of time spent waiting for data is checked (once per window
    on the logging rank; the progress line shows each logged step's data_wait_fraction)."""
    data_wait_warn_fraction: float = 0.1
    """Warn, naming the likely fixes, when a window's steps spend more than this share of
    their time waiting for data. In (0, 1]; 1 never warns."""
    save_interval: int = 500
    """Checkpoint every N steps (also on SIGTERM/SIGUSR1 and at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    eval_interval: int = 0
    """Validation every N steps (0: only at the end)."""
    eval_batches: int = 8
    eval_token_drop: bool = True
    """Validation and generated captions see the kept-token subset, as the official code
    evaluates; false feeds every patch token to the decoder instead."""
    max_nonfinite: int = 5
    """Consecutive non-finite losses that stop the run (each one skips its step)."""
    num_generate: int = 4
    """Validation images captioned greedily at each evaluation."""
    linear_probe: bool = True
    """Fit a linear probe on frozen features at the end. It reads shape and colour labels that
    only the synthetic set has, so it is switched off (said in the log) on your own shards."""


@dataclass
class RunConfig:
    name: str = "custom"
    stage: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic: dict = field(default_factory=dict)
    """If set (tiny_cpu), the synthetic dataset to build on first use: ensure_synthetic_dataset
    keyword arguments; data.val_shards/tokenizer_model are filled from it when empty. Ignored
    (never built) once data.train_shards is given; `--set synthetic=none` switches it off."""
    explicit: tuple[str, ...] = ()
    """Keys given with --set (filled by apply_overrides, not settable itself). A value the run
    derives from the data, model.decoder.vocab_size from the tokenizer, never replaces one."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)


def apply_overrides(run: RunConfig, assignments: list[str]) -> RunConfig:
    """Apply `section.key=value` strings (values parsed by the field's type)."""
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        if not sep:
            raise ValueError(f"--set {assignment!r}: expected key=value, e.g. train.steps=100")
        if path == "explicit":
            raise ValueError("--set explicit: this field records the --set keys; it is not set")
        target, names = run, path.split(".")
        for name in names[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, name):
                raise ValueError(f"--set {path}: unknown section {name!r}")
            target = getattr(target, name)
        _assign(target, names[-1], raw, path)
        run.explicit = (*run.explicit, path)
        _unset_alternatives(run, path)
    return run


# Ways to give one quantity: a recipe sets one of each group, and a --set of another member
# replaces it (--set train.steps=10 on a recipe that gives train.samples). Setting two members
# in one command is refused by validate_run, naming both.
ALTERNATIVES = (("train.samples", "train.steps"), ("train.base_lr", "train.lr"),
                ("train.warmup_samples", "train.warmup_steps", "train.warmup_fraction"))


def _unset_alternatives(run: RunConfig, path: str) -> None:
    for group in ALTERNATIVES:
        if path not in group or getattr(run.train, path.split(".")[1]) is None:
            continue
        for other in group:
            if other != path and other not in run.explicit:
                setattr(run.train, other.split(".")[1], None)


def _assign(target, name: str, raw: str, path: str) -> None:
    if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
        known = [f.name for f in dataclasses.fields(target)] if dataclasses.is_dataclass(target) else []
        raise ValueError(f"--set {path}: unknown key {name!r}; known: {', '.join(known)}")
    hint = typing.get_type_hints(type(target))[name]
    try:
        value = _parse(raw, hint)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--set {path}={raw}: {error}") from None
    if dataclasses.fields(target) and getattr(type(target), "__dataclass_params__").frozen:
        object.__setattr__(target, name, value)
    else:
        setattr(target, name, value)


def _parse(raw: str, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() in ("none", "null", ""):
            return None
        return _parse(raw, next(a for a in args if a is not type(None)))
    if hint is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return raw.lower() in ("true", "1")
    if hint in (int, float, str):
        return hint(raw)
    if origin is tuple:
        return _parse_tuple(raw, args)
    if hint is dict or origin is dict:  # only `synthetic`: a dict cannot be spelt on a command line
        if raw.strip().lower() not in ("none", "{}"):
            raise ValueError("only 'none' (switch it off) can be set here")
        return {}
    raise TypeError(f"cannot set a field of type {hint}")


def _parse_tuple(raw: str, args: tuple) -> tuple:
    """`0.5,1.0` or `(0.5, 1.0)` (the form --help-keys prints); a fixed-length tuple needs all
    its values, so a bare `0.5` for a (low, high) range is refused, not half-read."""
    parts = [part.strip() for part in raw.strip().strip("()[]").split(",") if part.strip()]
    fixed = Ellipsis not in args
    if fixed and len(parts) != len(args):
        example = "0.5,1.0" if len(args) == 2 else ",".join(["0.5"] * len(args))
        raise ValueError(f"expected {len(args)} comma-separated values, e.g. ({example}) or "
                         f"{example}; got {len(parts)}")
    return tuple(_parse(part, args[i] if fixed else args[0]) for i, part in enumerate(parts))


def validate_run(run: RunConfig, world_size: int,
                 device_capability: tuple[int, int] | None = None) -> SequenceGeometry:
    """Everything checkable before compute; each error names the field and the fix. Sizes
    first (the layout checks divide by them), then the layout, the fields, the model, paths, an
    existing run directory's model shape and, last, memory (it needs all the rest)."""
    from ov2_megatron.training import run_checks

    p, t = run.parallel, run.train
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size {world_size!r} must be >= 1")
    validate_parallel(p)
    check_minimums("train", t, TRAIN_MINIMUMS)
    _check_alternatives(t)
    _check_floats(t)
    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tensor "
                         f"({p.tensor}) x parallel.pipeline ({p.pipeline}): change the layout "
                         f"or launch a multiple of {model_parallel} ranks")
    dp = world_size // model_parallel
    if t.global_batch % (t.micro_batch * dp):
        raise ValueError(f"train.global_batch {t.global_batch} is not divisible by "
                         f"train.micro_batch ({t.micro_batch}) x data-parallel size ({dp}): "
                         f"use a multiple of {t.micro_batch * dp}")
    micro_batches = t.global_batch // (t.micro_batch * dp)
    if p.virtual_pipeline and micro_batches % p.pipeline:
        raise ValueError(f"interleaved pipelining needs micro-batches per step ({micro_batches}) "
                         f"divisible by parallel.pipeline ({p.pipeline}): adjust "
                         "train.global_batch or train.micro_batch")
    checks = [
        (t.precision in ("bf16", "fp32"), f"train.precision {t.precision!r}: use bf16 or fp32"),
        (t.recompute in ("none", "selective", "full"),
         f"train.recompute {t.recompute!r}: use none, selective or full"),
        (t.precision == "bf16" or not run.model.fp8, "model.fp8 needs train.precision=bf16"),
        (not overlap_settings(t)[1] or overlap_settings(t)[0],
         "train.overlap_param_gather needs train.overlap_grad_reduce (megatron gathers the "
         "weights from the buckets the overlapped reduce-scatter fills): set both, or neither"),
        (peak_lr(t) > 0 and 0 <= t.min_lr <= peak_lr(t),
         f"{lr_rule(t)} / train.min_lr {t.min_lr}: need 0 <= min_lr <= lr, lr > 0"),
        (total_steps(t) >= 1, f"train.samples {t.samples} is less than one global batch "
         f"({t.global_batch}): no step to train; raise train.samples or set train.steps"),
        (run.stage in (1, 2), f"stage {run.stage}: use 1 or 2"),
        (run.data.resolution == run.model.vision.image_size,
         f"data.resolution {run.data.resolution} != model.vision.image_size "
         f"{run.model.vision.image_size}: set both to the stage's resolution"),
        (t.eval_token_drop or run.model.decoder.pos_embed == "none",
         "train.eval_token_drop=false feeds every patch to the decoder, but learned decoder "
         "positions (model.decoder.pos_embed) only cover the kept tokens: keep token drop"),
        (run.data.caption_length == run.model.decoder.caption_length,
         f"data.caption_length {run.data.caption_length} != model.decoder.caption_length "
         f"{run.model.decoder.caption_length}: set both (>= 4; reference 128)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    run.data.validate_numbers()
    geom = validate_model(run.model, p, device_capability)
    run_checks.check_paths(run)
    run_checks.check_resume_shape(run)
    run_checks.check_resume_plan(run)
    run_checks.check_memory(run, world_size, geom)
    return geom


def overlap_settings(t: TrainConfig) -> tuple[bool, bool]:
    """(overlap_grad_reduce, overlap_param_gather) as they apply here: None means on a GPU."""
    import torch

    on_gpu = torch.cuda.is_available()
    return tuple(on_gpu if value is None else value
                 for value in (t.overlap_grad_reduce, t.overlap_param_gather))


# Integer fields of TrainConfig and their smallest legal value, with what each counts.
TRAIN_MINIMUMS = {
    "samples": (1, "images in this stage; none to give train.steps"),
    "steps": (1, "optimizer steps in this stage; none to give train.samples"),
    "warmup_samples": (0, "warmup images; none to use train.warmup_steps or warmup_fraction"),
    "global_batch": (1, "images per optimizer step over all replicas"),
    "micro_batch": (1, "images per forward/backward on one replica"),
    "warmup_steps": (0, "linear warmup steps; none to use train.warmup_samples or "
                     "warmup_fraction"),
    "seed": (0, "seeds init, token dropping and data order"),
    "log_interval": (1, "steps between metrics lines"),
    "data_wait_window": (1, "steps per data-wait check"),
    "save_interval": (1, "steps between checkpoints"),
    "keep_last": (1, "checkpoints kept"),
    "eval_interval": (0, "steps between validations, 0 for only at the end"),
    "eval_batches": (1, "validation batches per evaluation"),
    "max_nonfinite": (1, "consecutive non-finite losses that stop the run"),
    "num_generate": (0, "validation images captioned at each evaluation, 0 for none"),
}


def _check_floats(t: TrainConfig) -> None:
    checks = [
        (t.weight_decay >= 0, f"train.weight_decay {t.weight_decay} must be >= 0 (reference 0.2)"),
        (0 <= t.beta1 < 1, f"train.beta1 {t.beta1} must be in [0, 1) (reference 0.9)"),
        (0 <= t.beta2 < 1, f"train.beta2 {t.beta2} must be in [0, 1) (reference 0.95)"),
        (t.eps > 0, f"train.eps {t.eps} must be > 0 (Adam's denominator; reference 1e-8)"),
        (t.clip_grad >= 0, f"train.clip_grad {t.clip_grad} must be >= 0 (0 disables clipping)"),
        (0 < t.data_wait_warn_fraction <= 1,
         f"train.data_wait_warn_fraction {t.data_wait_warn_fraction} must be in (0, 1] (a share "
         "of step time; 1 never warns)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _check_alternatives(t: TrainConfig) -> None:
    """Exactly one member of each ALTERNATIVES group is set."""
    for group in ALTERNATIVES:
        given = [key for key in group if getattr(t, key.split(".")[1]) is not None]
        if len(given) > 1:
            values = ", ".join(f"{key} {getattr(t, key.split('.')[1])}" for key in given)
            raise ValueError(f"{values} are {'both' if len(given) == 2 else 'all'} set: keep "
                             f"one (--set {given[1]}=none keeps {given[0]}, or give only the "
                             "one you mean)")
        if not given:
            raise ValueError(f"{' / '.join(group)} are all none: set one")
    if t.warmup_fraction is not None and not 0 <= t.warmup_fraction < 1:
        raise ValueError(f"train.warmup_fraction {t.warmup_fraction} must be in [0, 1)")


def total_steps(train: TrainConfig) -> int:
    """Optimizer steps of the stage: train.steps, or train.samples // train.global_batch."""
    if train.samples is None:
        return train.steps
    return train.samples // train.global_batch


def peak_lr(train: TrainConfig) -> float:
    """The peak LR: train.lr, or train.base_lr x train.global_batch / 256."""
    if train.base_lr is None:
        return train.lr
    return train.base_lr * train.global_batch / 256


def length_rule(train: TrainConfig) -> str:
    steps = total_steps(train)
    if train.samples is None:
        return f"steps {steps:,} (train.steps)"
    return (f"steps {steps:,} (train.samples {train.samples:,} // train.global_batch "
            f"{train.global_batch}; {steps * train.global_batch:,} images)")


def lr_rule(train: TrainConfig) -> str:
    if train.base_lr is None:
        return f"lr {peak_lr(train):.3e} (train.lr)"
    return (f"lr {peak_lr(train):.3e} (train.base_lr {train.base_lr:.3e} x train.global_batch "
            f"{train.global_batch} / 256)")


def effective_warmup(train: TrainConfig) -> int:
    """Warmup steps: train.warmup_steps as given, or train.warmup_samples // global batch;
    warmup_fraction x the steps (floor); or, for a run too short for its absolute warmup, a
    tenth of it (the LR schedule needs the warmup to end before the last step). warmup_rule
    says which."""
    steps = total_steps(train)
    if train.warmup_fraction is not None:
        return int(train.warmup_fraction * steps)
    warmup = _absolute_warmup(train)
    return warmup if warmup < steps else steps // 10


def _absolute_warmup(train: TrainConfig) -> int:
    if train.warmup_samples is not None:
        return train.warmup_samples // train.global_batch
    return train.warmup_steps


def warmup_rule(train: TrainConfig) -> str:
    """The warmup and the rule that gave it, for the start line and --dry-run."""
    steps, warmup = total_steps(train), effective_warmup(train)
    if train.warmup_fraction is not None:
        return (f"warmup {warmup} steps (train.warmup_fraction {train.warmup_fraction} of "
                f"{steps} steps)")
    if train.warmup_samples is not None:
        field = (f"train.warmup_samples {train.warmup_samples:,} // train.global_batch "
                 f"{train.global_batch}")
        given = f"{_absolute_warmup(train)} steps ({field})"
    else:
        field, given = "train.warmup_steps", f"train.warmup_steps {train.warmup_steps}"
    if _absolute_warmup(train) < steps:
        return f"warmup {warmup:,} steps ({field})"
    return (f"warmup {warmup} steps: {given} does not fit in the run's {steps} steps, so a "
            "tenth of it (lower it, or use train.warmup_fraction)")
