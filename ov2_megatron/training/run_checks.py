"""The checks that look outside the config: paths, an existing run directory, the tokenizer
a checkpoint was trained with, and memory.

Each raises ValueError naming the field and the fix; all but the tokenizer's run in
`validate_run`, before any process group, allocation or write:
  * `check_paths`: train.output_dir is a directory (or can be one), data.tokenizer_model is a
    file, train.init_from, when it exists, is a checkpoint;
  * `check_resume_shape`: a run directory that holds a checkpoint was written by a model of
    the same shape. Resuming there with another one used to fail deep in the checkpoint load,
    after config.json had been overwritten with the new shape;
  * `check_same_tokenizer`: a resumed checkpoint or a stage-1 checkpoint (train.init_from)
    was trained with the tokenizer this run reads (its vocabulary's fingerprint, which the
    checkpoint records); checked once the checkpoint is chosen, before any step;
  * `check_memory`: the memory model's peak for one rank (perf/memory_model.py) plus the
    loader's batch buffers fit the device (GPU memory, or on CPU the host's available memory
    shared by its ranks).
"""

from __future__ import annotations

import dataclasses
import json
import os

from ov2_megatron.config import (DecoderConfig, ModelConfig, SequenceGeometry, VisionConfig)

GiB = 2**30
# A config for GPUs checked on a host without one (a login node's --dry-run) is held against
# the largest GPU memory there is (B200: 180 GiB usable), so only a layout that fits no GPU is
# refused there; the run itself checks its own GPU.
LARGEST_GPU_BYTES = 180 * GiB
# A web image as DALI decodes it before the resize (the source size is unknown until then).
_TYPICAL_DECODED_SIDE = 512


def check_paths(run) -> None:
    """Paths of the wrong kind: each message names the field and what it must be."""
    t, data = run.train, run.data
    existing = _first_existing(os.path.abspath(t.output_dir))
    if not os.path.isdir(existing):
        where = "is" if existing == os.path.abspath(t.output_dir) else f"is under {existing}, which is"
        raise ValueError(f"train.output_dir {t.output_dir} {where} a file, not a directory: "
                         "--set train.output_dir=DIR (a new or existing run directory)")
    if data.tokenizer_model:
        if os.path.isdir(data.tokenizer_model):
            raise ValueError(f"data.tokenizer_model {data.tokenizer_model} is a directory: "
                             "point it at the SentencePiece .model file inside "
                             "(tools/train_tokenizer.py writes NAME.model)")
        if not os.path.isfile(data.tokenizer_model):
            raise ValueError(f"data.tokenizer_model: tokenizer model {data.tokenizer_model} "
                             "does not exist: "
                             "--set data.tokenizer_model=PATH.model (tools/train_tokenizer.py)")
    if t.init_from and os.path.exists(t.init_from) and not _holds_checkpoint(t.output_dir):
        # A missing init_from is allowed here: a stage-2 plan is checked before stage 1 ran
        # (the load says so). One that exists must be a checkpoint.
        if not os.path.isdir(t.init_from) or not _holds_checkpoint(t.init_from):
            raise ValueError(f"train.init_from {t.init_from} is not a checkpoint (no meta.json, "
                             "no checkpoints/latest): point it at the stage-1 run directory, "
                             "its checkpoints/ or a step directory")


def _first_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return path
        path = parent
    return path


def _holds_checkpoint(path: str) -> bool:
    """Whether `path` (run, checkpoints/ or step dir) has a checkpoint, as checkpoint.resolve
    looks for one: meta.json, a `latest` file, or step directories (resolve falls back to
    them when `latest` is gone)."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if any(os.path.isfile(os.path.join(candidate, name)) for name in ("meta.json", "latest")):
            return True
        if os.path.isdir(candidate) and any(
                name.startswith("step_") and not name.endswith(".partial")
                and os.path.isfile(os.path.join(candidate, name, "meta.json"))
                for name in os.listdir(candidate)):
            return True
    return False


# --- resume ---------------------------------------------------------------------------------

def shape_fields(model: ModelConfig, explicit: tuple[str, ...] = ()) -> dict[str, object]:
    """What the checkpoint's tensor shapes depend on, by --set key (variants resolved, so
    `variant=L` and its explicit width compare equal)."""
    vision, decoder = model.vision, model.decoder
    vit, patch = vision.shape()
    dec = decoder.shape()
    fields = {f"model.vision.{k}": v for k, v in dataclasses.asdict(vit).items()}
    fields.update({"model.vision.patch_size": patch,
                   "model.vision.in_channels": vision.in_channels,
                   "model.vision.class_token": vision.class_token,
                   "model.vision.num_registers": vision.num_registers,
                   "model.vision.pos_embed": vision.pos_embed})
    fields.update({f"model.decoder.{k}": v for k, v in dataclasses.asdict(dec).items()})
    fields.update({"model.decoder.pos_embed": decoder.pos_embed,
                   "model.decoder.vocab_pad_multiple": decoder.vocab_pad_multiple})
    if vision.pos_embed == "learned":  # the table has one row per patch
        fields["model.vision.image_size"] = vision.image_size
    if decoder.pos_embed == "learned":  # one row per decoder position
        fields["model.decoder.caption_length"] = decoder.caption_length
        fields["model.vision.keep_ratio"] = vision.keep_ratio
    # The vocabulary follows the tokenizer after validation starts; compare it when pinned.
    if "model.decoder.vocab_size" in explicit:
        fields["model.decoder.vocab_size"] = decoder.vocab_size
    return fields


def saved_model(config_json: dict) -> ModelConfig:
    """The ModelConfig of a run's config.json (keys this version lacks are ignored)."""
    model = config_json.get("model", {})

    def build(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    top = {k: v for k, v in model.items() if k not in ("vision", "decoder")}
    return dataclasses.replace(build(ModelConfig, top),
                               vision=build(VisionConfig, model.get("vision", {})),
                               decoder=build(DecoderConfig, model.get("decoder", {})))


def check_resume_shape(run) -> None:
    """Refuse to resume a run directory whose checkpoint has another model shape, before
    anything (config.json first) is written there."""
    run_dir = run.train.output_dir
    config_path = os.path.join(run_dir, "config.json")
    if not (os.path.isfile(config_path) and _holds_checkpoint(run_dir)):
        return
    try:
        with open(config_path) as f:
            saved = saved_model(json.load(f))
        before = shape_fields(saved, run.explicit)
    except (ValueError, TypeError, AttributeError, OSError) as err:
        raise ValueError(f"train.output_dir {run_dir} holds a checkpoint, but its config.json "
                         f"cannot be read ({err}): use a new train.output_dir, or restore "
                         "config.json") from None
    now = shape_fields(run.model, run.explicit)
    differ = [f"{key} {before[key]!r} there, {now.get(key)!r} here"
              for key in before if before[key] != now.get(key)]
    differ += [f"{key} (not in the saved config) {now[key]!r} here"
               for key in now if key not in before]
    if differ:
        raise ValueError(f"train.output_dir {run_dir} holds a checkpoint of another model "
                         f"shape: {'; '.join(differ)}. Resume it with the same model (drop "
                         "those --set), or train this one elsewhere: --set "
                         "train.output_dir=NEW_DIR (with train.init_from=" f"{run_dir} to "
                         "start from its weights where the shapes allow)")


def latest_checkpoint_meta(run_dir: str) -> tuple[str, dict] | None:
    """(step dir, meta.json) of the checkpoint `latest` names in a run directory, read as it
    is (the load verifies it later); None when there is none or it cannot be read."""
    from ov2_megatron.training.checkpoint_resolve import read_latest

    root = os.path.join(run_dir, "checkpoints")
    name = read_latest(root)
    if name is None:
        return None
    step_dir = os.path.join(root, name)
    try:
        with open(os.path.join(step_dir, "meta.json")) as f:
            return step_dir, json.load(f)
    except (OSError, ValueError):
        return None


def check_resume_plan(run) -> None:
    """Refuse, before anything is written, a command that resuming train.output_dir could not
    carry out as asked: another stage there (a stage 2 pointed at the stage-1 run would
    continue stage 1), a length that ends before the checkpoint's step, or another tokenizer
    (run_checks.check_same_tokenizer). A changed schedule is not refused: the resume takes the
    command's (loop._continue_schedule says what changed)."""
    from ov2_megatron.training.run_config import length_rule, total_steps

    found = latest_checkpoint_meta(run.train.output_dir)
    if found is None:
        return
    step_dir, meta = found
    run_dir, step = run.train.output_dir, meta.get("step", 0)
    imported = bool(meta.get("layout", {}).get("imported"))  # step 0 of converted weights
    if not imported and meta.get("stage", run.stage) != run.stage:
        start = (f" with train.init_from={run.train.init_from}" if run.train.init_from
                 else f" (train.init_from={run_dir} starts it from these weights)")
        raise ValueError(
            f"train.output_dir {run_dir} holds a stage-{meta['stage']} run (step {step}): "
            f"--stage {run.stage} there would continue it, not start stage {run.stage}. Give "
            f"stage {run.stage} a directory of its own: --set train.output_dir=NEW_DIR{start}")
    if total_steps(run.train) < step:
        raise ValueError(
            f"{length_rule(run.train)} ends before step {step}, where the checkpoint in "
            f"{run_dir} is: raise the length (train.samples or train.steps) to continue it, or "
            "start anew in another train.output_dir")
    check_same_tokenizer(meta.get("tokenizer"), tokenizer_identity(run.data.tokenizer_model),
                         f"the checkpoint {step_dir}")


def tokenizer_identity(path: str) -> dict | None:
    """What a checkpoint records of the tokenizer it was trained with (None: no tokenizer)."""
    from ov2_megatron.data.tokenizer import CaptionTokenizer

    if not path:
        return None
    tokenizer = CaptionTokenizer.from_file(path)
    return dict(path=os.path.abspath(path), pieces=tokenizer.vocab_size,
                fingerprint=tokenizer.fingerprint())


def check_same_tokenizer(saved: dict | None, now: dict | None, checkpoint: str,
                         field: str = "data.tokenizer_model", fix: str = "") -> None:
    """Refuse weights trained with another tokenizer: with the same vocabulary size nothing
    else would notice, and the decoder would learn every caption under new token meanings.
    `saved` is the checkpoint's record (None in checkpoints written before it existed);
    `field` names where this tokenizer came from, `fix` replaces the training run's fix."""
    if saved is None or now is None or saved["fingerprint"] == now["fingerprint"]:
        return
    fix = fix or (f"--set data.tokenizer_model={saved['path']} (or a copy of it), or train "
                  "with the new tokenizer from scratch in a new train.output_dir")
    raise ValueError(
        f"{field} {now['path']} ({now['pieces']} pieces, vocabulary "
        f"{now['fingerprint'][:12]}) is not the tokenizer that {checkpoint} was trained with "
        f"({saved['path']}, {saved['pieces']} pieces, vocabulary {saved['fingerprint'][:12]}): "
        f"{fix}")


# --- memory ---------------------------------------------------------------------------------

def loader_bytes(data, micro_batch: int) -> float:
    """DALI's buffers for the batches in flight (prefetch + the one consumed): per image the
    decoded source (a typical web image; the real size is known only after decoding), the
    resized uint8 image, the colour ops' float copies and the float32 CHW output."""
    side = data.resolution
    decoded = 3 * max(side, _TYPICAL_DECODED_SIDE) ** 2
    per_image = decoded + 3 * side * side * (1 + 4 + 4 + 4)
    return (data.prefetch + 1) * micro_batch * per_image


def memory_budget(run, world_size: int) -> tuple[float, str, str]:
    """(bytes one rank may use, what that is, the kernel profile of the memory model)."""
    import torch

    gpu_layers = "gpu_local" if run.model.transformer_impl == "local" else "gpu_te"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"the {props.name}'s {props.total_memory / GiB:.1f} GiB", \
            gpu_layers
    if run.model.transformer_impl != "local":
        return LARGEST_GPU_BYTES, (f"{LARGEST_GPU_BYTES / GiB:.0f} GiB, the largest GPU (no GPU "
                                   "here: a GPU config checked on this host)"), gpu_layers
    import psutil

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    available = psutil.virtual_memory().available
    return available / max(ranks, 1), (f"this host's available {available / GiB:.1f} GiB "
                                       f"shared by {ranks} rank(s)"), "cpu_local"


def check_memory(run, world_size: int, geom: SequenceGeometry) -> None:
    """Refuse a step that cannot fit: the predicted peak of the fullest rank (model, optimizer,
    activations) plus the loader's buffers against `memory_budget`."""
    from ov2_megatron.perf.memory_model import PROFILES, StepShape, max_rank_memory

    t, p = run.train, run.parallel
    dp = world_size // (p.tensor * p.pipeline)
    step = StepShape(t.micro_batch, t.global_batch // (t.micro_batch * dp), dp, t.precision,
                     t.recompute)
    budget, where, profile = memory_budget(run, world_size)
    rank = max_rank_memory(run.model, p, geom, step, PROFILES[profile])
    loader = loader_bytes(run.data, t.micro_batch)
    need = rank.peak + loader
    if need <= budget:
        return
    hints = []
    if t.micro_batch > 1:
        hints.append(f"a smaller train.micro_batch (now {t.micro_batch}; gradient accumulation "
                     "keeps train.global_batch)")
    if t.recompute != "full":
        hints.append(f"train.recompute=full (now {t.recompute})")
    hints.append(f"more parallel.tensor / parallel.pipeline (now {p.tensor} / {p.pipeline})")
    raise ValueError(f"one rank needs about {need / GiB:.1f} GiB (memory model: static "
                     f"{rank.static / GiB:.1f}, activations {rank.activations / GiB:.1f}, "
                     f"transient {max(rank.transient, rank.optimizer_transient) / GiB:.1f}, "
                     f"inputs {rank.inputs / GiB:.1f}; data loader {loader / GiB:.1f}) but has "
                     f"{where}: use {', or '.join(hints)}")
