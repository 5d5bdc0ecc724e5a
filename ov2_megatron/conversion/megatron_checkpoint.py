"""Distributed checkpoint <-> one standard state dict (models/state_dict_adapter.py names).

Reading builds the whole model once, unsharded (TP=1, PP=1, one gloo rank), from the run's
config.json and loads the checkpoint into it with megatron's dist_checkpointing: since the
checkpoint's keys do not depend on the layout that wrote them, this reads any TP/PP/VPP
checkpoint. Before loading, every tensor the model expects is checked against the
checkpoint's metadata (missing, unexpected, wrong shape) and every data file against the
byte ranges the metadata points into (truncated), so a bad checkpoint fails with a message
naming the tensor or file rather than deep inside torch.distributed.checkpoint.

Writing starts TP x PP gloo ranks in fresh processes (megatron must be built in its own
process); each builds its chunks for that layout, copies in its shard of every standard
tensor and takes part in one dist_checkpointing.save. Tensors missing from the input may be
left at the layout-independent initialisation (`fresh` prefixes, e.g. the caption decoder of
an imported encoder).

    run_dir/config.json                     the RunConfig the checkpoint belongs to
    run_dir/checkpoints/latest              "step_00000000"
    run_dir/checkpoints/step_00000000/      dist_checkpointing files + meta.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
import typing

import torch

from ov2_megatron.config import ModelConfig, ParallelConfig, SequenceGeometry, geometry
from ov2_megatron.conversion import ConversionError
from ov2_megatron.conversion.atomic_output import staged_directory
from ov2_megatron.training import checkpoint_manifest
from ov2_megatron.training.run_config import RunConfig, validate_run

META_IMPORTED = "imported"


# -- the run configuration -------------------------------------------------------------------

def locate(path: str, config_path: str | None = None) -> tuple[str, RunConfig]:
    """A run dir, checkpoints/ dir or step dir -> (step dir, the run's RunConfig)."""
    from ov2_megatron.training import checkpoint

    try:
        step_dir = checkpoint.resolve(path)  # verified: sizes, sha256, metadata allow-list
    except (FileNotFoundError, ValueError) as error:
        raise ConversionError(str(error)) from None
    if step_dir is None:
        raise ConversionError(f"{path}: no checkpoint there (expected a run directory with "
                              "checkpoints/latest, a checkpoints/ directory, or a step directory "
                              "holding meta.json)")
    config_path = config_path or os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(step_dir))), "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{config_path} not found: the run's config.json (written by the "
                              f"training loop) describes the model of {step_dir}; pass --config")
    return step_dir, load_run_config(config_path)


def load_run_config(path: str) -> RunConfig:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: not a readable run config ({error})") from None
    return _dataclass_from_dict(RunConfig, data, path)


def _dataclass_from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConversionError(f"{where}: expected an object for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConversionError(f"{where}: unknown {cls.__name__} field(s) {unknown}: written by "
                              "another version of ov2_megatron?")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _dataclass_from_dict(hint, value, f"{where}:{name}")
        elif isinstance(value, list) and _is_tuple_hint(hint):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _is_tuple_hint(hint) -> bool:
    return typing.get_origin(hint) is tuple or any(
        typing.get_origin(arg) is tuple for arg in typing.get_args(hint))


def conversion_model(model: ModelConfig) -> ModelConfig:
    """The same weights built with the local spec in fp32-capable form (no TE, no FP8)."""
    return dataclasses.replace(model, transformer_impl="local", fp8=None)


def params_dtype(run: RunConfig) -> torch.dtype:
    return torch.bfloat16 if run.train.precision == "bf16" else torch.float32


def override_args(base, run, prefix: str = "") -> list[str]:
    """`--set key=value` strings that turn the RunConfig `base` (a recipe) into `run`, for
    `python -m ov2_megatron.train --recipe ... --set ...` (dict fields are not settable)."""
    out = []
    for field in dataclasses.fields(run):
        mine, theirs = getattr(run, field.name), getattr(base, field.name)
        if dataclasses.is_dataclass(mine):
            out += override_args(theirs, mine, f"{prefix}{field.name}.")
        elif mine != theirs and not isinstance(mine, dict):
            value = (",".join(map(str, mine)) if isinstance(mine, (tuple, list))
                     else str(mine).lower() if isinstance(mine, bool) or mine is None
                     else str(mine))
            out.append(f"{prefix}{field.name}={value}")
    return out


# -- expected names and shapes ---------------------------------------------------------------

def standard_shapes(model: ModelConfig, geom: SequenceGeometry) -> dict[str, tuple[int, ...]]:
    """Every tensor of the standard state dict of `model`, with its shape. None depends on the
    layout: alignment pads sequences with positions, never with parameters."""
    vit, patch = model.vision.shape()
    dec = model.decoder.shape()
    w, d = vit.width, dec.width
    shapes = {"vision.patch_embed.weight": (w, model.vision.in_channels, patch, patch)}
    if model.vision.class_token:
        shapes["vision.cls_token"] = (w,)
    if model.vision.num_registers:
        shapes["vision.registers"] = (model.vision.num_registers, w)
    if model.vision.pos_embed == "learned":
        shapes["vision.pos_embed"] = (geom.num_patches, w)
    shapes.update(_block_shapes("vision", vit))
    shapes.update({"vision.norm.weight": (w,), "vision.norm.bias": (w,),
                   "decoder.img_proj.weight": (d, w),
                   "decoder.tok_embed.weight": (model.decoder.vocab_size, d)})
    if model.decoder.pos_embed == "learned":
        shapes["decoder.pos_embed"] = (geom.decoder_tokens, d)  # real positions only
    shapes.update(_block_shapes("decoder", dec))
    shapes.update({"decoder.norm.weight": (d,), "decoder.norm.bias": (d,),
                   "decoder.head.weight": (model.decoder.vocab_size, d)})
    return shapes


def _block_shapes(tower: str, shape) -> dict[str, tuple[int, ...]]:
    w, m = shape.width, shape.mlp_dim
    per_layer = {"ln1.weight": (w,), "ln1.bias": (w,), "attn.qkv.weight": (3 * w, w),
                 "attn.qkv.bias": (3 * w,), "attn.proj.weight": (w, w), "attn.proj.bias": (w,),
                 "ln2.weight": (w,), "ln2.bias": (w,), "mlp.fc1.weight": (m, w),
                 "mlp.fc1.bias": (m,), "mlp.fc2.weight": (w, m), "mlp.fc2.bias": (w,)}
    return {f"{tower}.blocks.{i}.{part}": s for i in range(shape.depth)
            for part, s in per_layer.items()}


def check_standard(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                   source: str, fresh: tuple[str, ...] = ()) -> None:
    """Names and shapes of `state` against `expected`; names under a `fresh` prefix may be
    missing (they keep their initialisation)."""
    problems = [f"unexpected tensor {name} {tuple(state[name].shape)}"
                for name in state if name not in expected]
    problems += [f"missing tensor {name} {shape}" for name, shape in expected.items()
                 if name not in state and not name.startswith(fresh)]
    problems += [f"{name} has shape {tuple(state[name].shape)}, the model needs {shape}"
                 for name, shape in expected.items()
                 if name in state and tuple(state[name].shape) != shape]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more"
                                          if len(problems) > 8 else "")
        raise ConversionError(f"{source} does not match the model config: {shown}")


# -- reading ---------------------------------------------------------------------------------

def load_model(step_dir: str, run: RunConfig, device: str = "cpu"):
    """The whole model as one unsharded chunk with the checkpoint's weights (this process
    becomes a one-rank megatron job). Returns (chunk, geometry)."""
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.training import checkpoint, safe_unpickle

    # Built unsharded, so at the geometry of TP=1 (no alignment padding): the parameters are
    # the same at every layout's geometry, and encode() runs without padded positions.
    model = conversion_model(run.model)
    geom = geometry(model, ParallelConfig())
    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    initialize(ParallelLayout(), seed=run.train.seed)
    chunk = build_chunks(model, ParallelConfig(), geom, "local", params_dtype(run))[0]
    if device != "cpu":
        chunk.to(device)
    sharded = checkpoint.model_sharded_state([chunk])
    try:
        safe_unpickle.check_metadata(step_dir)  # before torch unpickles it
    except safe_unpickle.UnsafeCheckpointError as error:
        raise ConversionError(str(error)) from None
    _check_metadata(step_dir, sharded["model0"])
    _check_data_files(step_dir)
    try:
        checkpoint.load_weights(step_dir, [chunk])
    except Exception as error:  # torch.distributed.checkpoint wraps what went wrong
        raise ConversionError(f"{step_dir}: reading the weights failed: "
                              f"{type(error).__name__}: {error}") from error
    return chunk.eval(), geom


def load_for_inference(checkpoint: str, config_path: str | None, device: str | None):
    """The model of `checkpoint` (any TP/PP) as one float32 eval chunk on `device` (default:
    cuda when available), for the tools that run it. Returns (step_dir, run, chunk, geometry,
    device)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    step_dir, run = locate(checkpoint, config_path)
    chunk, geom = load_model(step_dir, run, device)
    return step_dir, run, chunk.float(), geom, device


def read_standard(step_dir: str,
                  run: RunConfig) -> tuple[dict[str, torch.Tensor], SequenceGeometry]:
    """The checkpoint as a standard state dict (fp32, full tensors, vocabulary unpadded)."""
    chunk, geom = load_model(step_dir, run)
    return standard_of(chunk, run, geom, step_dir), geom


def standard_of(chunk, run: RunConfig, geom: SequenceGeometry,
                source: str) -> dict[str, torch.Tensor]:
    """A loaded unsharded chunk (load_model) -> its standard state dict, checked."""
    from ov2_megatron.models.state_dict_adapter import to_standard

    full = {name: param.detach().float().cpu().clone()
            for name, param in chunk.named_parameters()}
    standard = to_standard(full, chunk.plan, run.model.vision.shape()[0].num_heads,
                           run.model.decoder.shape().num_heads, run.model.decoder.vocab_size)
    check_standard(standard, standard_shapes(run.model, geom), source)
    return standard


def _check_metadata(step_dir: str, expected: dict) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    from ov2_megatron.models.state_dict_adapter import is_extra_state

    try:
        saved = load_tensors_metadata(step_dir)
    except Exception as error:
        raise ConversionError(f"{step_dir}: cannot read the checkpoint's metadata "
                              f"({type(error).__name__}: {error}): incomplete or damaged") from None
    tensors = {t.key: tuple(t.global_shape) for t in expected.values()
               if isinstance(t, ShardedTensor)}
    problems = [f"missing tensor {key} {shape}" for key, shape in tensors.items()
                if key not in saved]
    problems += [f"{key} has shape {tuple(saved[key].global_shape)}, config.json's model needs "
                 f"{shape}" for key, shape in tensors.items()
                 if key in saved and tuple(saved[key].global_shape) != shape]
    problems += [f"unexpected tensor {key}" for key in saved
                 if key not in tensors and not is_extra_state(key)]  # TE's FP8 metadata
    if problems:
        raise ConversionError(f"{step_dir} does not match the model of its config.json: "
                              + "; ".join(problems[:8]))


def _check_data_files(step_dir: str) -> None:
    """Every byte range the torch_dist metadata points at must exist (a truncated copy fails
    here, naming the file and a tensor stored in it)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(step_dir).read_metadata().storage_data
    except Exception as error:
        raise ConversionError(f"{step_dir}: cannot read the torch_dist metadata (.metadata): "
                              f"{type(error).__name__}: {error}") from None
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        path = os.path.join(step_dir, info.relative_path)
        if path not in sizes:
            if not os.path.isfile(path):
                raise ConversionError(f"{path} is missing: it holds {index.fqn} of this "
                                      "checkpoint")
            sizes[path] = os.path.getsize(path)
        if info.offset + info.length > sizes[path]:
            raise ConversionError(
                f"{path} is truncated: {sizes[path]} bytes, but {index.fqn} is stored at bytes "
                f"[{info.offset}, {info.offset + info.length})")


# -- writing ---------------------------------------------------------------------------------

def write_distributed(standard: dict[str, torch.Tensor], run: RunConfig, output: str,
                      source: str, fresh: tuple[str, ...] = (), note: str = "") -> str:
    """Write `standard` as a run directory holding a step-0 checkpoint saved at run.parallel's
    layout; returns its step dir. Training continues from it with
    `--set train.output_dir=OUTPUT` (weights loaded, optimizer and schedule start fresh)."""
    p = run.parallel
    world = p.tensor * p.pipeline
    try:
        geom = validate_run(run, world)
    except ValueError as error:
        raise ConversionError(f"the target run config is invalid: {error}") from None
    check_standard(standard, standard_shapes(run.model, geom), source, fresh)
    run.train.output_dir = os.path.abspath(output)
    step_name = "step_00000000"
    with staged_directory(output) as staging, \
            tempfile.TemporaryDirectory(dir=os.path.dirname(staging)) as transfer_dir:
        transfer = os.path.join(transfer_dir, "standard.pt")
        torch.save(standard, transfer)
        step_dir = os.path.join(staging, "checkpoints", step_name)
        os.makedirs(step_dir)
        _spawn(world, run, transfer, step_dir)
        meta = dict(name=run.name, stage=run.stage, step=0, note=note, source=source,
                    # Not a training layout: a resume loads the weights and starts the
                    # optimizer, schedule and data position afresh.
                    layout={META_IMPORTED: True, "tensor": p.tensor, "pipeline": p.pipeline})
        with open(os.path.join(step_dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        checkpoint_manifest.write(step_dir)  # the training loop's format: verified on load
        with open(os.path.join(staging, "checkpoints", "latest"), "w") as f:
            f.write(step_name + "\n")
        with open(os.path.join(staging, "config.json"), "w") as f:
            f.write(run.to_json())
    return os.path.join(os.path.abspath(output), "checkpoints", step_name)


def _spawn(world: int, run: RunConfig, transfer: str, step_dir: str) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.spawn(_write_rank, args=(world, port, run, transfer, step_dir), nprocs=world,
                 join=True)
    except mp.ProcessRaisedException as error:
        raise ConversionError(f"writing the distributed checkpoint failed on a rank:\n{error}") \
            from None


def _write_rank(rank: int, world: int, port: int, run: RunConfig, transfer: str,
                step_dir: str) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    from ov2_megatron.models import state_dict_adapter as adapter
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize, shutdown
    from ov2_megatron.training import checkpoint

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    p = run.parallel
    initialize(ParallelLayout(p.tensor, p.pipeline, p.virtual_pipeline), seed=run.train.seed)
    model = conversion_model(run.model)
    geom = geometry(run.model, p)
    chunks = build_chunks(model, p, geom, "local", params_dtype(run), init_seed=run.train.seed)
    standard = torch.load(transfer, weights_only=True)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    vit_heads, dec_heads = model.vision.shape()[0].num_heads, model.decoder.shape().num_heads
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            std = adapter.standard_name(name, chunk.plan)
            if std not in standard:
                continue  # a `fresh` tensor: keeps its initialisation
            try:
                adapter.copy_from_standard(param, name, chunk.plan, standard[std], vit_heads,
                                           dec_heads, geom.padded_vocab, tp, tp_rank)
            except ValueError as error:
                raise ConversionError(str(error)) from None
    dist_checkpointing.save(checkpoint.model_sharded_state(chunks), step_dir)
    torch.distributed.barrier()
    shutdown()
