"""Recipes as code: each returns the RunConfig of one stage of the two-stage OpenVision 2
schedule (CLIPA-style: low resolution first, then a short high-resolution stage that starts
from the stage-1 weights, with the position embedding adapted and a fresh LR schedule).

    python -m ov2_megatron.train --recipe tiny_cpu                  # make demo
    python -m ov2_megatron.train --recipe vit_l14 --stage 1         # 8+ GPUs
    sbatch launch/vit_1b.slurm                                      # g/14, multi-node

A recipe may name the shards of each stage (ShardSets): stage 1 a low-resolution copy made by
`tools/prepare_shards.py --resize 128`, stage 2 the full-size set, e.g.
    def vit_l14_datacomp(stage=1):
        return vit_l14(stage, ShardSets(stage1="/data/datacomp-128px", stage2="/data/datacomp"))
`--set data.train_shards=...` still overrides the stage's set.
"""

from __future__ import annotations

from dataclasses import dataclass

from ov2_megatron.config import (DecoderConfig, ModelConfig, ParallelConfig, VisionConfig,
                                 padded_vocab_size)
from ov2_megatron.data.config import DataConfig
from ov2_megatron.training.run_config import RunConfig, TrainConfig


@dataclass(frozen=True)
class ShardSets:
    """The training shards of each stage of a recipe (each any data.train_shards spec)."""

    stage1: str = ""
    """Stage 1 (84 px): a copy with short side 96-128 px (tools/prepare_shards.py --resize)
    has ~14x fewer pixels to decode than a 480x640 original; the crops keep their field of
    view (what changes: data/resize_shards.py). Empty: stage 1 reads `stage2`."""
    stage2: str = ""
    """Stage 2 (224+ px): the full-size shards (a low-resolution copy would upscale every
    crop). Empty: set data.train_shards with --set."""
    val: str = ""
    """Validation shards of both stages (data.val_shards); empty holds out a training shard."""

    def train_for(self, stage: int) -> str:
        return (self.stage1 or self.stage2) if stage == 1 else self.stage2


def tiny_cpu(stage: int = 1) -> RunConfig:
    """Minutes on 2 CPU cores; needs nothing but the package (it draws its own dataset).

    A 4-layer ViT (width 128) with 8 px patches on 48 px synthetic scenes (a 6x6 patch grid,
    as ViT-x/14 at the paper's 84 px), stage 2 at 64 px, and a 2-layer decoder over a
    128-piece SentencePiece vocabulary. Half the patch tokens are kept (the paper keeps 35%
    at scale; at this size the denser view makes the demo learn within minutes)."""
    resolution = 48 if stage == 1 else 64
    model = ModelConfig(
        vision=VisionConfig(variant="Ti/16", image_size=resolution, patch_size=8, width=128,
                            depth=4, mlp_dim=512, num_heads=4, keep_ratio=0.5),
        decoder=DecoderConfig(variant="B", width=128, depth=2, mlp_dim=512, num_heads=4,
                              vocab_size=128, vocab_pad_multiple=128, caption_length=48,
                              pad_id=0),
        transformer_impl="local")
    # The official rules at a demo's size: lengths in images (300 and 60 steps at batch 64),
    # the LR per 256 images (2e-3 and 2e-4 at 64). Lighter decay, fp32 (CPU).
    train = TrainConfig(
        samples=19_200 if stage == 1 else 3_840, steps=None, global_batch=64, micro_batch=32,
        base_lr=8e-3 if stage == 1 else 8e-4, lr=None,
        warmup_samples=1_920 if stage == 1 else 320, warmup_steps=None,
        weight_decay=0.05, precision="fp32", seed=0, output_dir=f"runs/tiny_cpu/stage{stage}",
        init_from="" if stage == 1 else "runs/tiny_cpu/stage1", log_interval=20,
        save_interval=100, eval_interval=0, eval_batches=4, num_generate=4)
    # Captions name colours: hue jitter and grayscale make them unlearnable at demo scale.
    data = DataConfig(resolution=resolution, caption_length=48, crop_scale=(0.8, 1.0),
                      color_jitter=0.0, grayscale_probability=0.0, num_threads=2, seed=0,
                      shuffle_buffer=512)
    return RunConfig(name="tiny_cpu", stage=stage, model=model, parallel=ParallelConfig(),
                     data=data, train=train,
                     synthetic=dict(num_train=8000, num_val=256, image_size=64, seed=0,
                                    vocab_size=128))


# The released OpenVision 2 schedule (src/configs/openvision2.py and
# scripts/project/openvision2/train.sh of the official code): lengths in "virtual ImageNet
# epochs" of 1,281,167 images, LR per 256 images, both following the global batch.
IMAGENET_EPOCH = 1_281_167
STAGES = {  # stage: (epochs, warmup epochs, global batch, base LR)
    1: (10_000, 40, 32_768, 8e-6),  # 12.8B images at 84 px, peak LR 1.024e-3
    2: (800, 20, 16_384, 4e-7),  # 1.02B images at 224+ px, peak LR 2.56e-5
}
# The official tf.data shuffle buffer (per reading process): DALI's webdataset reader holds
# as many encoded samples per rank (host memory ~ 250k x the mean stored sample size).
OFFICIAL_SHUFFLE_BUFFER = 250_000


def _paper_stages(name: str, vision: VisionConfig, parallel: ParallelConfig, stage: int,
                  stage2_resolution: int, micro_batch: int, shards: ShardSets) -> RunConfig:
    """The released OpenVision 2 schedule: 84 px at batch 32k, then 224+ px at 16k, with the
    official optimizer (no gradient clipping, decay mask and initialisation as defaulted)."""
    first = stage == 1
    vision.image_size = 84 if first else stage2_resolution
    epochs, warmup_epochs, batch, base_lr = STAGES[stage]
    model = ModelConfig(vision=vision, decoder=DecoderConfig(variant="L", vocab_size=32000,
                                                             caption_length=128),
                        transformer_impl="auto")
    train = TrainConfig(
        samples=epochs * IMAGENET_EPOCH, steps=None, global_batch=batch, micro_batch=micro_batch,
        base_lr=base_lr, lr=None, min_lr=0.0, warmup_samples=warmup_epochs * IMAGENET_EPOCH,
        warmup_steps=None, weight_decay=0.2, clip_grad=0.0, precision="bf16",
        output_dir=f"runs/{name}/stage{stage}",
        init_from="" if first else f"runs/{name}/stage1", log_interval=10, save_interval=1000,
        eval_interval=5000)
    data = DataConfig(train_shards=shards.train_for(stage), val_shards=shards.val,
                      resolution=vision.image_size, caption_length=128, crop_scale=(0.4, 1.0),
                      num_threads=8, shuffle_buffer=OFFICIAL_SHUFFLE_BUFFER)
    return RunConfig(name=name, stage=stage, model=model, parallel=parallel, data=data,
                     train=train)


def vit_l14(stage: int = 1, shards: ShardSets = ShardSets()) -> RunConfig:
    """ViT-L/14 + decoder-L (the paper's main model): DP only, the model fits one H100."""
    vision = VisionConfig(variant="L/14", keep_ratio=0.35)
    return _paper_stages("vit_l14", vision, ParallelConfig(), stage, 224,
                         micro_batch=256 if stage == 1 else 64, shards=shards)


def vit_1b(stage: int = 1, shards: ShardSets = ShardSets()) -> RunConfig:
    """ViT-g/14 (1.01B) + decoder-L: TP=2 with SP inside a node keeps activations per GPU
    within H100 80 GB at the micro-batch below; data parallel over the rest."""
    vision = VisionConfig(variant="g/14", keep_ratio=0.35)
    return _paper_stages("vit_1b", vision, ParallelConfig(tensor=2, sequence_parallel=True),
                         stage, 224, micro_batch=128 if stage == 1 else 32, shards=shards)


RECIPES = {"tiny_cpu": tiny_cpu, "vit_l14": vit_l14, "vit_1b": vit_1b}


def get_recipe(name: str, stage: int = 1) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    if stage not in (1, 2):
        raise ValueError(f"--stage {stage}: use 1 or 2")
    return RECIPES[name](stage)


def vocab_rule(pieces: int) -> str:
    """What the recipes allocate for a tokenizer of `pieces` pieces, as tools/train_tokenizer.py
    says it: model.decoder.vocab_size follows the tokenizer, and the embedding and head are
    padded to the recipe's model.decoder.vocab_pad_multiple (a fixed multiple, any TP)."""
    by_multiple: dict[int, list[str]] = {}
    for name in RECIPES:
        by_multiple.setdefault(get_recipe(name).model.decoder.vocab_pad_multiple, []).append(name)
    rules = [f"{padded_vocab_size(pieces, m)} for {', '.join(names)} (a multiple of {m})"
             for m, names in sorted(by_multiple.items(), reverse=True)]  # the paper's first
    return (f"vocab size: {pieces} (the model pads it to {'; to '.join(rules)}: "
            "model.decoder.vocab_pad_multiple). model.decoder.vocab_size follows "
            "data.tokenizer_model by itself: leave it unset")
