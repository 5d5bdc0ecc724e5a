"""The analytic FLOP count (models/flops.py) against torch.utils.flop_counter on the real
training step: loop.build_model_and_optimizer + loop.train_step, megatron layers, CPU.

FlopCounterMode counts every matmul, batched matmul and convolution the step dispatches,
forward, backward and recomputation included; the optimizer adds none. Real variant widths,
sequence lengths, heads and vocabularies, with the depths cut so that it stays cheap (the
count is linear in depth)."""

import pytest

from tests.harness import run_distributed

# (name, ViT variant, image px, ViT depth, keep ratio, decoder, decoder depth, vocab, caption,
#  micro-batch, micro-batches, recompute, extra vision / decoder settings)
CASES = [
    ("L14_84px_keep035", "L/14", 84, 2, 0.35, "L", 1, 32000, 128, 2, 1, "none", {}, {}),
    ("B16_224px_keep025", "B/16", 224, 1, 0.25, "B", 1, 8000, 32, 1, 2, "none", {}, {}),
    ("S16_64px_prefix_learned_full_recompute", "S/16", 64, 2, 0.5, "B", 2, 1000, 24, 2, 2,
     "full", dict(num_registers=3, pos_embed="learned"), dict(mask="prefix", pos_embed="learned")),
    ("Ti16_96px_keep03_selective", "Ti/16", 96, 2, 0.3, "B", 1, 500, 16, 2, 1, "selective",
     {}, {}),
]


def count_case(case):
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ov2_megatron.config import DecoderConfig, ModelConfig, VisionConfig
    from ov2_megatron.data.config import DataConfig
    from ov2_megatron.models.flops import model_flops_per_sample, train_flops_per_sample
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.perf.benchmark import SyntheticStream
    from ov2_megatron.training.loop import build_model_and_optimizer, train_step
    from ov2_megatron.training.run_config import RunConfig, TrainConfig, validate_run

    (name, variant, px, depth, keep, dec, dec_depth, vocab, caption, micro, micro_batches,
     recompute, vision_extra, decoder_extra) = case
    model = ModelConfig(
        vision=VisionConfig(variant=variant, image_size=px, depth=depth, keep_ratio=keep,
                            **vision_extra),
        decoder=DecoderConfig(variant=dec, depth=dec_depth, vocab_size=vocab,
                              caption_length=caption, **decoder_extra),
        transformer_impl="local")
    run = RunConfig(model=model, data=DataConfig(resolution=px, caption_length=caption),
                    train=TrainConfig(global_batch=micro * micro_batches, micro_batch=micro,
                                      precision="fp32", recompute=recompute, seed=5))
    geom = validate_run(run, 1)
    initialize(ParallelLayout(), seed=5)
    built = build_model_and_optimizer(run, geom)
    batches, _ = SyntheticStream(run, geom, micro_batches, 0, torch.device("cpu")).step_batches(0)
    # torch's counter knows addmm but not its in-place form, with which the chunked loss
    # accumulates the head's weight gradient: count it as addmm.
    def addmm_flops(_self, a, b, *_, out_shape=None, **__):
        return 2 * a[0] * a[1] * b[1]

    in_place = {torch.ops.aten.addmm_: addmm_flops}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        train_step(*built, batches, geom, micro)
    samples = micro * micro_batches
    return dict(name=name, counted=counter.get_total_flops(),
                analytic=train_flops_per_sample(copy.deepcopy(model), geom, recompute) * samples,
                model_flops=model_flops_per_sample(model, geom) * samples)


def count_all():
    return [count_case(case) for case in CASES]


@pytest.fixture(scope="module")
def counts():
    return run_distributed(count_all, 1, timeout=240)[0]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_analytic_flops_match_flop_counter(counts, index):
    case = counts[index]
    error = case["analytic"] / case["counted"] - 1
    print(f"{case['name']}: counted {case['counted']:.4e}, analytic {case['analytic']:.4e} "
          f"({error:+.3%})")
    assert abs(error) < 0.02
    if CASES[index][11] != "none":  # recomputation ran: hardware FLOPs above model FLOPs
        assert case["counted"] > case["model_flops"] * 1.001


def test_recompute_terms():
    from ov2_megatron.config import ModelConfig, ParallelConfig, VisionConfig, validate_model
    from ov2_megatron.models import flops

    model = ModelConfig(vision=VisionConfig(variant="L/14", image_size=224))
    geom = validate_model(model, ParallelConfig())
    parts = flops.flop_breakdown(model, geom)
    base = flops.model_flops_per_sample(model, geom)
    assert base == pytest.approx(3 * parts.forward - parts.embed)
    # the chunked caption loss (the default) recomputes the head's logits in backward
    assert model.decoder.loss_kernel == "chunked"
    assert flops.train_flops_per_sample(model, geom, "none") - base == pytest.approx(parts.head)
    assert flops.train_flops_per_sample(model, geom, "full") - base == pytest.approx(
        parts.encoder + parts.decoder + parts.head)
    assert flops.train_flops_per_sample(model, geom, "selective") - base == pytest.approx(
        parts.encoder_attention + parts.decoder_attention + parts.head)
    model.decoder.loss_kernel = "plain"  # megatron's head: no recompute, padded vocabulary
    plain = flops.flop_breakdown(model, geom)
    assert flops.train_flops_per_sample(model, geom, "none") == \
        flops.model_flops_per_sample(model, geom)
    assert plain.head / parts.head == geom.padded_vocab / model.decoder.vocab_size
    # ViT-L/14 at 224 px: ~80% of the forward is the encoder, ~1% the vocabulary head.
    assert 0.75 < parts.encoder / parts.forward < 0.85
    assert flops.peak_for("NVIDIA GB200", flops.PEAK_BF16) == 2500e12
    assert flops.peak_for("NVIDIA H100 80GB HBM3", flops.PEAK_BF16) == 989e12
