"""Two training steps compared in one invocation, reported as ratios.

`megatron_vs_reference`: the megatron model's real training step (loop.build_model_and_optimizer
+ loop.train_step: DDP buffers, distributed optimizer, pipeline schedule) against the
independent pure-PyTorch twin of tests/reference with the same weights (state_dict_adapter),
on the same batches and kept-token indices, CPU, TP = 1. Their first losses must agree (the
same model); steps alternate A, B, A, B so drift in machine load hits both alike.

`ov1_vs_ov2`: the same encoder trained with OpenVision 1's objective (models/openvision1.py:
text encoder + contrastive loss + captioning on all tokens) and OpenVision 2's (captioning on
the kept ~35%), same batch, same optimizer (torch AdamW), megatron layers for both. Time from
alternating steps in this process; peak memory from one fresh, pinned process per model
(peak_memory.py), each measured after a shallow twin of itself warmed the libraries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from ov2_megatron.config import DecoderConfig, ModelConfig, ParallelConfig, VisionConfig
from ov2_megatron.parallel.initialize import local_device
from ov2_megatron.perf.comm_timing import BlockedTimer

GiB = 2**30


def scaled_l14(keep_ratio: float = 0.35) -> ModelConfig:
    """ViT-L/14 @ 224 + decoder L in miniature, for CPU comparisons: the same token counts
    (256 patches from 128 px / patch 8, 89 kept, 127 caption positions) and the same ratios
    of decoder to encoder width (3/4) and depth (1/2), at width 192 (ViT-Ti) and a vocabulary
    scaled with the decoder width (32000 x 144/768 = 6000)."""
    return ModelConfig(
        vision=VisionConfig(variant="Ti/16", image_size=128, patch_size=8, width=192, depth=6,
                            mlp_dim=768, num_heads=3, keep_ratio=keep_ratio),
        decoder=DecoderConfig(variant="B", width=144, depth=3, mlp_dim=576, num_heads=3,
                              vocab_size=6000, vocab_pad_multiple=128, caption_length=128),
        transformer_impl="local")


def model_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(vision=VisionConfig(**d["vision"]), decoder=DecoderConfig(**d["decoder"]),
                       **{k: v for k, v in d.items() if k not in ("vision", "decoder")})


def _batch(model: ModelConfig, geom, batch: int, seed: int):
    from ov2_megatron.models.token_drop import keep_indices
    from ov2_megatron.perf.benchmark import synthetic_captions

    gen = torch.Generator().manual_seed(seed)
    size, dec = model.vision.image_size, model.decoder
    images = torch.randn(batch, model.vision.in_channels, size, size, generator=gen)
    tokens = synthetic_captions(batch, dec.caption_length, dec.vocab_size, dec.pad_id, gen)
    keep = keep_indices(torch.arange(seed * batch, (seed + 1) * batch), geom.num_patches,
                        geom.num_kept, seed)
    return tuple(t.to(local_device()) for t in (images, tokens, keep))


def _alternate(steps: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each named step once per round, in turn; seconds per round and name."""
    times = {name: [] for name in steps}
    for round_ in range(warmup + rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(round_)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


# --- megatron vs the pure-PyTorch twin ------------------------------------------------------

def _reference_twin(model: ModelConfig, geom):
    from tests.reference.openvision2_reference import (DecoderConfig as RefDecoder,
                                                       OpenVision2Reference,
                                                       VisionConfig as RefVision)

    vit, patch = model.vision.shape()
    dec = model.decoder.shape()
    v, d = model.vision, model.decoder
    return OpenVision2Reference(
        RefVision(image_size=v.image_size, patch_size=patch, width=vit.width, depth=vit.depth,
                  mlp_dim=vit.mlp_dim, num_heads=vit.num_heads, in_channels=v.in_channels,
                  class_token=v.class_token, num_registers=geom.num_registers,
                  pos_embed=v.pos_embed, layernorm_eps=model.layernorm_eps),
        RefDecoder(dec_width=dec.width, dec_depth=dec.depth, dec_mlp_dim=dec.mlp_dim,
                   dec_num_heads=dec.num_heads, vocab_size=d.vocab_size, pad_id=d.pad_id,
                   mask=d.mask, loss_weight=d.loss_weight, dec_pos_embed=d.pos_embed,
                   max_text_len=d.caption_length, layernorm_eps=model.layernorm_eps))


def _copy_weights(chunk, reference, model: ModelConfig) -> None:
    from ov2_megatron.models import state_dict_adapter

    vit, _ = model.vision.shape()
    full = {n: p.detach() for n, p in chunk.named_parameters()}
    standard = state_dict_adapter.to_standard(full, chunk.plan, vit.num_heads,
                                              model.decoder.shape().num_heads,
                                              model.decoder.vocab_size)
    state = reference.state_dict()
    for name, value in standard.items():
        state[name] = value if name != "decoder.pos_embed" else \
            torch.cat([value, state[name][value.shape[0]:]])
    reference.load_state_dict(state)


def _reference_optimizer(reference, train):
    """AdamW as configured for megatron: no decay on 1-D parameters and the extra tokens."""
    decay, plain = [], []
    for name, param in reference.named_parameters():
        skip = param.ndim == 1 or name.endswith(("cls_token", "registers", "pos_embed"))
        (plain if skip else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": plain, "weight_decay": 0.0}], lr=train.lr,
                             betas=(train.beta1, train.beta2), eps=train.eps, foreach=False)


def _recording(fn, sink: list):
    """`fn`, appending the seconds of each call to `sink`."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        sink.append(time.perf_counter() - start)
        return result
    return wrapper


def megatron_vs_reference(run, rounds: int = 5) -> dict:
    """In a single-rank world: megatron train_step vs the twin's step, alternating. Only the
    first losses are comparable (megatron's LR schedule warms up, the twin's AdamW does not)."""
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.training.loop import build_model_and_optimizer, train_step
    from ov2_megatron.training.run_config import validate_run
    from ov2_megatron.training.step import MicroBatch

    if torch.cuda.is_available():
        raise ValueError("--vs-reference is a CPU comparison (the twin has no GPU kernels)")
    if run.parallel != ParallelConfig() or run.train.global_batch != run.train.micro_batch:
        raise ValueError("--vs-reference compares one rank at TP = PP = 1 and one micro-batch "
                         "per step (train.global_batch = train.micro_batch)")
    geom = validate_run(run, 1)
    initialize(ParallelLayout(), seed=run.train.seed)
    model, optimizer, scheduler = build_model_and_optimizer(run, geom, "local")
    reference = _reference_twin(run.model, geom)
    _copy_weights(model[0].module, reference, run.model)
    ref_optimizer = _reference_optimizer(reference, run.train)
    b = run.train.micro_batch
    batches = [_batch(run.model, geom, b, seed) for seed in range(rounds + 1)]
    losses = {"megatron": [], "reference": []}
    split = {"megatron_optimizer": [], "megatron_collectives": [], "reference_optimizer": []}
    optimizer.step = _recording(optimizer.step, split["megatron_optimizer"])
    reference_optimizer_step = _recording(ref_optimizer.step, split["reference_optimizer"])
    blocked = BlockedTimer()

    def megatron_step(i):
        before = blocked.total()
        with blocked.active():
            loss, _, _ = train_step(model, optimizer, scheduler, [MicroBatch(*batches[i])],
                                    geom, b)
        split["megatron_collectives"].append(blocked.total() - before)
        losses["megatron"].append(loss)  # train_step reports the unweighted caption loss

    def reference_step(i):
        ref_optimizer.zero_grad(set_to_none=True)
        out = reference(*batches[i])
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), run.train.clip_grad)
        reference_optimizer_step()
        losses["reference"].append(float(out["caption_loss"]))

    times = _alternate({"megatron": megatron_step, "reference": reference_step}, rounds)
    median = {k: statistics.median(v) for k, v in times.items()}
    part = {k: statistics.median(v[1:]) for k, v in split.items()}  # [0]: the warm-up round
    return dict(
        megatron_s=median["megatron"], reference_s=median["reference"],
        ratio=median["megatron"] / median["reference"], times_s=times,
        split_s=dict(megatron=dict(optimizer=part["megatron_optimizer"],
                                   collectives=part["megatron_collectives"],
                                   forward_backward=median["megatron"]
                                   - part["megatron_optimizer"]),
                     reference=dict(optimizer=part["reference_optimizer"],
                                    forward_backward=median["reference"]
                                    - part["reference_optimizer"])),
        first_loss=dict(megatron=losses["megatron"][0], reference=losses["reference"][0]),
        parameters=sum(p.numel() for p in reference.parameters()),
        threads=torch.get_num_threads())


# --- OpenVision 1 vs OpenVision 2 -----------------------------------------------------------

class _Trainer:
    """One model of the comparison with its AdamW; `step(batch)` -> loss."""

    def __init__(self, kind: str, model: ModelConfig, seed: int):
        from ov2_megatron.config import validate_model
        from ov2_megatron.models.init import initialize_weights
        from ov2_megatron.models.openvision1 import OpenVision1
        from ov2_megatron.models.openvision2 import build_chunks

        vit, _ = model.vision.shape()
        dec = model.decoder.shape()
        self.kind, self.geom = kind, validate_model(model, ParallelConfig())
        if kind == "ov2":
            (self.module,) = build_chunks(model, ParallelConfig(), self.geom, init_seed=seed)
        elif kind == "ov1":
            self.module = OpenVision1(model)
            initialize_weights(self.module.captioner, seed, model.init_std, vit.num_heads,
                               dec.num_heads, model.decoder.vocab_size)
        else:
            raise ValueError(f"model kind {kind!r}: use ov1 or ov2")
        self.module.to(local_device())
        self.weight = model.decoder.loss_weight
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-4, foreach=False)

    def step(self, images, tokens, keep) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.kind == "ov2":
            sums = self.module(images, tokens, keep)
            loss = self.weight * sums["loss_sum"] / sums["num_tokens"].clamp(min=1)
        else:
            loss = self.module(images, tokens)["loss"]
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _shallow(model: ModelConfig) -> ModelConfig:
    import copy

    twin = copy.deepcopy(model)
    twin.vision.depth = twin.decoder.depth = 1
    return twin


def probe_memory(kind: str, model: ModelConfig, batch: int, seed: int = 0) -> dict:
    """In a fresh process started with peak_memory.pinned_environment(): peak bytes of one
    training step of `kind` above the pre-model baseline, with its weights and Adam state."""
    import gc

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.perf.peak_memory import PeakMemory

    initialize(ParallelLayout(), seed=seed)
    warm = _Trainer(kind, _shallow(model), seed)
    warm.step(*_batch(model, warm.geom, batch, seed))
    del warm
    gc.collect()
    memory = PeakMemory(local_device())
    memory.baseline()
    trainer = _Trainer(kind, model, seed)
    data = _batch(model, trainer.geom, batch, seed)
    trainer.step(*data)  # allocates Adam's moments
    memory.reset()
    trainer.step(*data)
    params = sum(p.numel() for p in trainer.module.parameters())
    return dict(kind=kind, peak_bytes=memory.peak_bytes(), parameters=params,
                method=memory.method)


def _probe_in_subprocess(kind: str, model: ModelConfig, batch: int) -> dict:
    from ov2_megatron.perf.peak_memory import pinned_environment

    env = pinned_environment()
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS=str(
        torch.get_num_threads()))
    env.pop("MASTER_PORT", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-W", "ignore", "-m", "ov2_megatron.perf.side_by_side", "probe", kind,
           json.dumps(dataclasses.asdict(model)), str(batch)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ov1_vs_ov2(model: ModelConfig, batch: int, rounds: int = 3, seed: int = 0,
               measure_memory: bool = True) -> dict:
    """Time both objectives alternately in this process; memory in two fresh processes."""
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    initialize(ParallelLayout(), seed=seed)
    trainers = {kind: _Trainer(kind, model, seed) for kind in ("ov1", "ov2")}
    geom = trainers["ov2"].geom
    batches = [_batch(model, geom, batch, seed + i) for i in range(rounds + 1)]
    losses = {kind: [] for kind in trainers}
    steps = {kind: (lambda i, k=kind: losses[k].append(trainers[k].step(*batches[i])))
             for kind in trainers}
    times = _alternate(steps, rounds)
    result = dict(time_s={k: statistics.median(v) for k, v in times.items()}, times_s=times,
                  losses=losses, batch=batch,
                  parameters={k: sum(p.numel() for p in t.module.parameters())
                              for k, t in trainers.items()})
    result["time_ratio"] = result["time_s"]["ov1"] / result["time_s"]["ov2"]
    del trainers
    if measure_memory:
        memory = {kind: _probe_in_subprocess(kind, model, batch) for kind in ("ov1", "ov2")}
        result["memory_bytes"] = {k: v["peak_bytes"] for k, v in memory.items()}
        result["memory_ratio"] = memory["ov1"]["peak_bytes"] / memory["ov2"]["peak_bytes"]
        result["memory_method"] = memory["ov2"]["method"]
    return result


def predicted_ov1_over_ov2(model: ModelConfig, micro_batch: int, precision: str = "bf16",
                           profile: str = "gpu_te") -> dict:
    """The analytic models' OV1 / OV2 ratios at any scale (one GPU, no parallelism): memory
    from perf/memory_model.py, FLOPs from models/flops.py, for OV1 = OV2 with every token
    kept + a decoder-shaped causal text encoder over the caption + two projections."""
    import copy

    from ov2_megatron.config import validate_model
    from ov2_megatron.models.flops import model_flops_per_sample
    from ov2_megatron.parallel.pipeline_split import layer_flops
    from ov2_megatron.perf import memory_model as mm

    one = ParallelConfig()
    step = mm.StepShape(micro_batch, 1, 1, precision)
    kernels = mm.PROFILES[profile]
    geom2 = validate_model(model, one)
    ov2 = mm.rank_memory(model, one, geom2, step, 0, kernels)
    all_tokens = copy.deepcopy(model)
    all_tokens.vision.keep_ratio = 1.0
    geom1 = validate_model(all_tokens, one)
    captioner = mm.rank_memory(all_tokens, one, geom1, step, 0, kernels)
    text, length = model.decoder.shape(), model.decoder.caption_length
    vit, _ = model.vision.shape()
    e = mm.BYTES[precision]
    text_params = (text.depth * mm.layer_parameters(text, 1) + geom1.padded_vocab * text.width
                   + length * text.width + 2 * text.width + (vit.width + text.width) * text.width)
    per_param = e + 4 + 8 + (4 if precision == "bf16" else 0)  # weight, grad, Adam, master
    text_activations = micro_batch * length * text.width * e * 2 + text.depth * \
        mm.layer_activations(text, length, micro_batch, one, e, kernels, "none")
    ov1_peak = captioner.peak + text_params * per_param + text_activations
    text_flops = 3 * text.depth * layer_flops(text, length)
    ov1_flops = model_flops_per_sample(all_tokens, geom1) + text_flops
    return dict(memory_ratio=ov1_peak / ov2.peak, flops_ratio=ov1_flops / model_flops_per_sample(
        model, geom2), ov1_peak_gib=ov1_peak / GiB, ov2_peak_gib=ov2.peak / GiB)


def _main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[0] != "probe":
        raise SystemExit("usage: python -m ov2_megatron.perf.side_by_side probe KIND "
                         "MODEL_JSON BATCH")
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    result = probe_memory(argv[1], model_from_dict(json.loads(argv[2])), int(argv[3]))
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
