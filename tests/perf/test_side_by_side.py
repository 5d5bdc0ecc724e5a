"""The side-by-side comparisons: megatron vs the pure-PyTorch twin (same weights, so the same
first loss) and OpenVision 1 vs 2 (the v1 model's two losses checked against their parts).
Timing ratios are printed, never asserted: they are measurements, not properties."""

import pytest

from ov2_megatron.perf.peak_memory import PINNED
from tests.harness import run_distributed


def tiny_model(keep_ratio=0.5, width=64, image=32, vocab=100, caption=12):
    from ov2_megatron.config import DecoderConfig, ModelConfig, VisionConfig

    return ModelConfig(
        vision=VisionConfig(variant="Ti/16", image_size=image, patch_size=8, width=width,
                            depth=2, mlp_dim=2 * width, num_heads=4, num_registers=1,
                            keep_ratio=keep_ratio),
        decoder=DecoderConfig(variant="B", width=48, depth=2, mlp_dim=96, num_heads=4,
                              vocab_size=vocab, vocab_pad_multiple=128, caption_length=caption),
        transformer_impl="local", init_std=0.05)


def check_ov1_parts():
    """OV1's caption loss is OV2's with every token kept; its contrastive loss is CLIP's loss
    on the encoder's pooled feature and the text encoder's EOS feature."""
    import torch
    import torch.nn.functional as F

    from ov2_megatron.config import ParallelConfig, validate_model
    from ov2_megatron.models.init import initialize_weights
    from ov2_megatron.models.openvision1 import OpenVision1
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.perf.side_by_side import _batch

    model = tiny_model(keep_ratio=1.0)
    geom = validate_model(model, ParallelConfig())
    (ov2,) = build_chunks(model, ParallelConfig(), geom, init_seed=4)
    ov1 = OpenVision1(model)
    initialize_weights(ov1.captioner, 4, model.init_std, 4, 4, model.decoder.vocab_size)
    images, tokens, _ = _batch(model, geom, 6, seed=1)
    out = ov1(images, tokens)
    every = torch.arange(geom.num_patches).expand(6, -1)
    sums = ov2(images, tokens, every)
    _, pooled = ov2.encode(images)
    image = F.normalize(ov1.image_projection(pooled), dim=-1)
    text = F.normalize(ov1.text_projection(ov1.text_encoder(tokens)), dim=-1)
    logits = ov1.logit_scale.exp() * image @ text.t()
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    out["contrastive_loss"].backward()
    reached = {prefix: any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                           for n, p in ov1.named_parameters() if n.startswith(prefix))
               for prefix in ("captioner.vision_layers", "text_encoder.layers",
                              "captioner.decoder_layers")}
    extra = sum(p.numel() for n, p in ov1.named_parameters() if not n.startswith("captioner."))
    text_params = sum(p.numel() for p in ov1.text_encoder.parameters())
    return dict(caption=(float(out["caption_loss"]), float(sums["loss_sum"] / sums["num_tokens"])),
                contrastive=(float(out["contrastive_loss"]), float(clip)), reached=reached,
                extra=extra, text_params=text_params, captioner=sum(
                    p.numel() for p in ov1.captioner.parameters()),
                ov2=sum(p.numel() for p in ov2.parameters()))


def compare_all():
    from ov2_megatron.data.config import DataConfig
    from ov2_megatron.perf import side_by_side
    from ov2_megatron.training.run_config import RunConfig, TrainConfig
    from tools.vs_reference import megatron_vs_reference

    run = RunConfig(model=tiny_model(), data=DataConfig(resolution=32, caption_length=12),
                    train=TrainConfig(global_batch=4, micro_batch=4, precision="fp32", seed=2))
    vs_reference = megatron_vs_reference(run, rounds=1)
    parts = check_ov1_parts()
    ov1_ov2 = side_by_side.ov1_vs_ov2(tiny_model(), batch=4, rounds=1, measure_memory=False)
    # Large enough (~10-20 MiB) to read above the method's page-level noise.
    bigger = tiny_model(width=128, image=64, vocab=3000, caption=33)
    memory = {kind: side_by_side.probe_memory(kind, bigger, 8) for kind in ("ov1", "ov2")}
    return vs_reference, parts, ov1_ov2, memory


@pytest.fixture(scope="module")
def compared():
    mp = pytest.MonkeyPatch()
    for key, value in PINNED.items():
        mp.setenv(key, value)
    try:
        return run_distributed(compare_all, 1, timeout=240, fresh_interpreter=True)[0]
    finally:
        mp.undo()


def test_megatron_and_reference_train_the_same_model(compared):
    result = compared[0]
    print(f"tiny: megatron {result['megatron_s'] * 1e3:.1f} ms, reference "
          f"{result['reference_s'] * 1e3:.1f} ms, ratio {result['ratio']:.2f}")
    losses = result["first_loss"]
    assert losses["megatron"] == pytest.approx(losses["reference"], rel=1e-5)
    assert losses["megatron"] > 3.0  # ~ln(100): an untrained model over 100 tokens
    split = result["split_s"]["megatron"]
    assert 0 < split["optimizer"] < result["megatron_s"]
    assert 0 <= split["collectives"] < split["forward_backward"]


def test_ov1_losses_equal_their_parts(compared):
    parts = compared[1]
    assert parts["caption"][0] == pytest.approx(parts["caption"][1], rel=1e-5)
    assert parts["contrastive"][0] == pytest.approx(parts["contrastive"][1], rel=1e-5)
    # The contrastive loss trains both towers, not the caption decoder.
    assert parts["reached"] == {"captioner.vision_layers": True, "text_encoder.layers": True,
                                "captioner.decoder_layers": False}
    # Same captioner as OV2; OV1 adds a text encoder, two projections and the temperature.
    assert parts["captioner"] == parts["ov2"]
    assert parts["extra"] == parts["text_params"] + 64 * 48 + 48 * 48 + 1


def test_ov1_costs_more_than_ov2(compared):
    timing, memory = compared[2], compared[3]
    print(f"tiny: OV1/OV2 time {timing['time_ratio']:.2f}x, memory "
          f"{memory['ov1']['peak_bytes'] / memory['ov2']['peak_bytes']:.2f}x")
    assert timing["parameters"]["ov1"] > timing["parameters"]["ov2"]
    assert all(len(losses) == 2 for losses in timing["losses"].values())
    # Structural, not a timing claim: more weights, Adam state and activations.
    assert memory["ov1"]["peak_bytes"] > memory["ov2"]["peak_bytes"] > 0
