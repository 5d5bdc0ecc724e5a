"""Two training steps compared in one invocation, reported as ratios; steps alternate
A, B, A, B so drift in machine load hits both alike. (The megatron step against the
pure-PyTorch twin of tests/reference lives in tools/vs_reference.py: the library does not
import the test tree.)

`ov1_vs_ov2`: the same encoder trained with OpenVision 1's objective as the official code
defines it (models/openvision1.py: text encoder over two captions, contrastive loss, decoder
on all tokens + a text prefix) and OpenVision 2's (captioning on the kept ~35%), same batch,
same optimizer (torch AdamW), megatron layers for both; with `breakdown`, also OV1 with its
parts switched off one by one (BREAKDOWN). Time from alternating steps in this process; peak
memory from one fresh, pinned process per model (peak_memory.py), each measured after a
shallow twin of itself warmed the libraries. `predicted_ov1_over_ov2` is the analytic
counterpart, per component, checked against those measurements and evaluated at the paper's
TPU setting (docs/benchmarks/2026-12-02-ov1-vs-ov2-breakdown.md).

`loss_kernels`: one OpenVision 2 model with the plain caption head (fp32 [tokens, vocab]
logits) and with the chunked linear + cross-entropy (decoder.loss_kernel), same weights and
batches: step time alternately, peak memory in fresh processes, and the head's share of the
peak against a twin whose vocabulary is 128 (where the head costs ~nothing).
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

from kernels.linear_cross_entropy import CHUNK_BYTES
from ov2_megatron.config import DecoderConfig, ModelConfig, ParallelConfig, VisionConfig
from ov2_megatron.parallel.initialize import local_device

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


# --- OpenVision 1 vs OpenVision 2 -----------------------------------------------------------

# OpenVision 1 (models/openvision1.py) with its parts switched off one at a time, from the
# paper's objective down to OpenVision 2: each step's cost difference is that part's share.
OV1_VARIANTS = {
    "ov1": {},  # text encoder, contrastive loss, decoder on all tokens + text prefix
    "ov1_no_contrastive": dict(contrastive=False),  # text encoder for the prefix only
    "ov1_no_text": dict(contrastive=False, text_prefix=False),  # no text tower at all
    "ov1_token_drop": dict(contrastive=False, text_prefix=False, keep_ratio=None),  # model's
}
BREAKDOWN = (*OV1_VARIANTS, "ov2")
PART_NAMES = {  # the part between one kind of BREAKDOWN and the next
    "ov1": "contrastive loss (2nd caption, heads, [b, B] logits)",
    "ov1_no_contrastive": "text encoder + its 79-token decoder prefix",
    "ov1_no_text": "decoder on all vs kept image tokens",
    "ov1_token_drop": "learned queries vs caption embedding",
}


def ov1_options(kind: str, model: ModelConfig) -> dict:
    options = dict(OV1_VARIANTS[kind])
    if "keep_ratio" in options:
        options["keep_ratio"] = model.vision.keep_ratio
    return options


class _Trainer:
    """One model of the comparison with its AdamW; `step(batch)` -> loss."""

    def __init__(self, kind: str, model: ModelConfig, seed: int):
        from ov2_megatron.config import validate_model
        from ov2_megatron.models.init import initialize_weights
        from ov2_megatron.models.openvision1 import OpenVision1
        from ov2_megatron.models.openvision2 import build_chunks

        self.kind, self.geom = kind, validate_model(model, ParallelConfig())
        if kind == "ov2":
            (self.module,) = build_chunks(model, ParallelConfig(), self.geom, init_seed=seed)
        elif kind in OV1_VARIANTS:
            self.module = OpenVision1(model, **ov1_options(kind, model))
            initialize_weights(self.module.captioner, seed, model)
        else:
            raise ValueError(f"model kind {kind!r}: use ov2 or one of {', '.join(OV1_VARIANTS)}")
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


def _alternate_trainers(trainers: dict, model: ModelConfig, batch: int, rounds: int,
                        seed: int) -> dict:
    """Steps of each trainer in turn on the same batches: median and all times, losses."""
    geom = next(iter(trainers.values())).geom
    batches = [_batch(model, geom, batch, seed + i) for i in range(rounds + 1)]
    losses = {kind: [] for kind in trainers}
    steps = {kind: (lambda i, k=kind: losses[k].append(trainers[k].step(*batches[i])))
             for kind in trainers}
    times = _alternate(steps, rounds)
    return dict(time_s={k: statistics.median(v) for k, v in times.items()}, times_s=times,
                losses=losses, batch=batch)


def ov1_vs_ov2(model: ModelConfig, batch: int, rounds: int = 3, seed: int = 0,
               measure_memory: bool = True, breakdown: bool = False) -> dict:
    """Time both objectives alternately in this process; memory in fresh processes. With
    `breakdown`, every kind of BREAKDOWN (OV1 with parts switched off) as well, and each
    part's memory and time with its share of OV1 - OV2 (`parts`)."""
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    kinds = BREAKDOWN if breakdown else ("ov1", "ov2")
    initialize(ParallelLayout(), seed=seed)
    trainers = {kind: _Trainer(kind, model, seed) for kind in kinds}
    result = _alternate_trainers(trainers, model, batch, rounds, seed)
    result["parameters"] = {k: sum(p.numel() for p in t.module.parameters())
                            for k, t in trainers.items()}
    result["time_ratio"] = result["time_s"]["ov1"] / result["time_s"]["ov2"]
    del trainers
    if measure_memory:
        memory = {kind: _probe_in_subprocess(kind, model, batch) for kind in kinds}
        result["memory_bytes"] = {k: v["peak_bytes"] for k, v in memory.items()}
        result["memory_ratio"] = memory["ov1"]["peak_bytes"] / memory["ov2"]["peak_bytes"]
        result["memory_method"] = memory["ov2"]["method"]
    if breakdown:
        result["parts"] = _parts(result)
    return result


def _parts(result: dict) -> dict:
    """Each step of BREAKDOWN: the cost it removes and its share of OV1 - OV2."""
    parts = {}
    for kind, after in zip(BREAKDOWN, BREAKDOWN[1:]):
        part = {}
        for key in ("time_s", "memory_bytes"):
            if key in result:
                values = result[key]
                delta = values[kind] - values[after]
                part[key] = delta
                part[key.split("_")[0] + "_share"] = delta / (values["ov1"] - values["ov2"])
        part["parameters"] = result["parameters"][kind] - result["parameters"][after]
        parts[PART_NAMES[kind]] = part
    return parts


def l14_decoder_at_vocab_32k() -> ModelConfig:
    """scaled_l14's encoder and token counts with vit_l14's real decoder width (768, 12
    heads, MLP 3072; 2 layers) and vocabulary (32000): the caption head at full size."""
    model = scaled_l14()
    model.decoder = DecoderConfig(variant="L", width=768, depth=2, mlp_dim=3072, num_heads=12,
                                  vocab_size=32000, vocab_pad_multiple=1024, caption_length=128)
    return model


def loss_kernels(model: ModelConfig, batch: int, rounds: int = 3, seed: int = 0,
                 measure_memory: bool = True) -> dict:
    """Plain vs chunked caption loss in one training step (see the module docstring)."""
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    initialize(ParallelLayout(), seed=seed)
    variants = {kernel: _with_loss_kernel(model, kernel) for kernel in ("plain", "chunked")}
    trainers = {kernel: _Trainer("ov2", m, seed) for kernel, m in variants.items()}
    result = _alternate_trainers(trainers, model, batch, rounds, seed)
    geom = trainers["plain"].geom
    result.update(caption_tokens=batch * geom.text_len, vocab=geom.padded_vocab,
                  decoder_width=model.decoder.shape().width)
    result["time_ratio"] = result["time_s"]["chunked"] / result["time_s"]["plain"]
    del trainers
    if measure_memory:
        small = _with_loss_kernel(model, "plain")
        small.decoder.vocab_size, small.decoder.vocab_pad_multiple = 128, 128
        probes = {k: _probe_in_subprocess("ov2", m, batch)
                  for k, m in (*variants.items(), ("vocab_128", small))}
        peaks = {k: probe["peak_bytes"] for k, probe in probes.items()}
        # Above the vocab-128 twin, less the larger embedding's and head's weights, grads and
        # AdamW moments (4 + 4 + 8 bytes each, fp32): what the loss computation itself holds.
        static = 16 * (probes["plain"]["parameters"] - probes["vocab_128"]["parameters"])
        head = {k: peaks[k] - peaks["vocab_128"] - static for k in variants}
        result.update(memory_bytes=peaks, head_bytes=head, vocab_state_bytes=static,
                      memory_ratio=peaks["plain"] / peaks["chunked"],
                      # Below one fp32 logits chunk the subtraction reads noise: floor there.
                      head_memory_ratio=head["plain"] / max(head["chunked"], CHUNK_BYTES))
    return result


def _with_loss_kernel(model: ModelConfig, kernel: str) -> ModelConfig:
    import copy

    variant = copy.deepcopy(model)
    variant.decoder.loss_kernel = kernel
    return variant


@dataclasses.dataclass(frozen=True)
class Accounting:
    """How one device holds a training step, for predicted_ov1_over_ov2."""
    activation_bytes: int
    """Bytes per activation element (compute dtype)."""
    state_bytes: int
    """Bytes per parameter: weight + gradient + optimizer state."""
    profile: str
    """memory_model.PROFILES key: whether attention probabilities are materialised."""
    encoder_recompute: str
    """'full' or 'none' for the ViT and the text encoder (official remat_policy)."""
    decoder_recompute: str
    """The same for the caption decoder."""


ACCOUNTING = {
    # _Trainer on CPU: fp32 weights, gradients and torch AdamW's two moments, no recompute.
    "cpu_fp32": Accounting(4, 4 + 4 + 8, "cpu_local", "none", "none"),
    # The official TPU runs (scripts/project/openvision*/train.sh, configs/openvision*.py): bf16
    # activations, fp32 weights and gradients, Adam mu in bf16 + nu in fp32, XLA attention
    # without flash (use_flash_attn=False), remat 'full' on the ViT and the text encoder,
    # 'none' on the decoder; weights replicated (fsdp_parallelism=1).
    "tpu_paper": Accounting(2, 4 + 4 + 2 + 4, "cpu_local", "full", "none"),
}


def predicted_ov1_over_ov2(model: ModelConfig, micro_batch: int, accounting: str = "cpu_fp32",
                           global_batch: int | None = None, text_length: int = 80) -> dict:
    """Peak memory of one device for every kind of BREAKDOWN by component (bytes), from the
    shapes (memory_model's per-layer terms), and forward+backward FLOPs per image. The head is
    the plain one (fp32 [T, b, V] logits, as the official code). `global_batch` (default: one
    device's) sets the contrastive logits [b, B]."""
    from ov2_megatron.config import validate_model
    from ov2_megatron.parallel.pipeline_split import layer_flops
    from ov2_megatron.perf import memory_model as mm

    acc = ACCOUNTING[accounting]
    profile = mm.PROFILES[acc.profile]
    e, b, one = acc.activation_bytes, micro_batch, ParallelConfig()
    B = global_batch or micro_batch
    vit, patch = model.vision.shape()
    dec = model.decoder.shape()
    text, L = dec, text_length  # the text tower is the decoder's size (L/14: both 768 x 12)
    geom = validate_model(model, one)
    V, T, N, w, d = geom.padded_vocab, geom.text_len, geom.num_patches, vit.width, dec.width
    vit_params = (model.vision.in_channels * patch * patch * w + geom.vit_prefix * w
                  + vit.depth * mm.layer_parameters(vit, 1))
    text_params = text.depth * mm.layer_parameters(text, 1) + (V + L + 2) * text.width
    decoder_params = dec.depth * mm.layer_parameters(dec, 1) + 2 * d + V * d + w * d

    def layers(shape, depth, seq, batch, recompute):
        kept = depth * mm.layer_activations(shape, seq, batch, one, e, profile, recompute)
        return kept, mm.layer_backward_transient(shape, seq, batch, one, e, profile, recompute)

    def kind(contrastive: bool, text_prefix: bool, kept: int, queries: bool) -> dict:
        s_dec = kept + (L - 1) * text_prefix + T
        captions = 2 if contrastive else 1
        static = vit_params + decoder_params + (T * d if queries else V * d)
        if contrastive or text_prefix:
            static += text_params + text.width * d * text_prefix
        if contrastive:
            static += 2 * w + (w + text.width) * text.width + 1
        parts = dict(static=static * acc.state_bytes)
        parts["vit"], vit_t = layers(vit, vit.depth, geom.vit_seq, b, acc.encoder_recompute)
        parts["text"], text_t = 0.0, 0.0
        if contrastive or text_prefix:
            parts["text"], text_t = layers(text, text.depth, L, captions * b,
                                           acc.encoder_recompute)
        parts["decoder"], dec_t = layers(dec, dec.depth, s_dec, b, acc.decoder_recompute)
        parts["decoder"] += (kept * w + (L - 1) * text.width * text_prefix) * b * e  # proj in
        logits = T * b * V * 4
        parts["head"] = 2 * s_dec * b * d * e + 8 * s_dec * b + logits
        # Four [b, B] fp32 logits, each kept twice (scaled product, softmax) for backward.
        parts["contrastive"] = 4 * 2 * b * B * 4.0 if contrastive else 0.0
        parts["transient"] = max(vit_t, text_t, dec_t, logits + V * d * e)
        parts["inputs"] = b * (model.vision.in_channels * model.vision.image_size ** 2 * 4
                               + (T + 1 + 2 * L) * 8)
        flops = 3 * (vit.depth * layer_flops(vit, geom.vit_tokens)
                     + dec.depth * layer_flops(dec, s_dec) + 2 * T * d * V)
        if acc.encoder_recompute == "full":  # remat re-runs the encoder's forward
            flops += vit.depth * layer_flops(vit, geom.vit_tokens)
        if contrastive or text_prefix:
            flops += captions * text.depth * layer_flops(text, L) * (
                4 if acc.encoder_recompute == "full" else 3)
        return dict(peak_bytes=sum(parts.values()), parts=parts, flops=flops)

    kinds = {"ov1": kind(True, True, N, True),
             "ov1_no_contrastive": kind(False, True, N, True),
             "ov1_no_text": kind(False, False, N, True),
             "ov1_token_drop": kind(False, False, geom.num_kept, True),
             "ov2": kind(False, False, geom.num_kept, False)}
    ov1, ov2 = kinds["ov1"], kinds["ov2"]
    return dict(kinds=kinds, memory_ratio=ov1["peak_bytes"] / ov2["peak_bytes"],
                flops_ratio=ov1["flops"] / ov2["flops"], ov1_peak_gib=ov1["peak_bytes"] / GiB,
                ov2_peak_gib=ov2["peak_bytes"] / GiB, accounting=accounting)


def paper_l14(image_size: int = 224) -> ModelConfig:
    """The paper's comparison model: ViT-L/14 + decoder L (768 x 12), vocabulary 32000,
    caption length 128, keep ratio 0.35 (OV2), at 224 px (or the 84 px of stage 1)."""
    return ModelConfig(vision=VisionConfig(variant="L/14", image_size=image_size,
                                           keep_ratio=0.35),
                       decoder=DecoderConfig(variant="L", vocab_size=32000, caption_length=128,
                                             loss_kernel="plain"),
                       transformer_impl="local")


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
