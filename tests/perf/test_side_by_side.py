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
        transformer_impl="local", init="megatron", init_std=0.05)


def check_ov1_parts():
    """OV1's contrastive loss is CLIP's on the pooled image feature and the text encoder's CLS
    feature of both captions; its caption loss reads the alt-text through the decoder prefix
    (and only through it when the prefix is on); each switch removes what it names."""
    import torch
    import torch.nn.functional as F

    from ov2_megatron.config import ParallelConfig, validate_model
    from ov2_megatron.models.init import initialize_weights
    from ov2_megatron.models.openvision1 import OpenVision1, text_inputs
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.perf.side_by_side import _batch

    model = tiny_model(keep_ratio=1.0)
    geom = validate_model(model, ParallelConfig())
    (ov2,) = build_chunks(model, ParallelConfig(), geom, init_seed=4)
    torch.manual_seed(0)
    ov1 = OpenVision1(model, text_length=8)
    initialize_weights(ov1.captioner, 4, model)
    images, tokens, _ = _batch(model, geom, 6, seed=1)
    texts = text_inputs(tokens, 8, cls_id=1)
    texts[:, 1, :3] = 7  # the second caption differs from the alt-text
    out = ov1(images, tokens, texts)
    patches = ov1.captioner.vision_layers(ov1.captioner.embedding(images), attention_mask=None)
    pooled = ov1.pooled_norm(patches[geom.vit_prefix:geom.vit_tokens].mean(dim=0))
    image = F.normalize(ov1.image_head(pooled), dim=-1)
    target = torch.arange(6)
    clip = []
    for k in range(2):
        text = F.normalize(ov1.text_head(ov1.text_encoder(texts[:, k])[0]), dim=-1)
        logits = ov1.logit_scale.exp() * image @ text.t()
        clip.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2)
    out["contrastive_loss"].backward()
    reached = {prefix: any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                           for n, p in ov1.named_parameters() if n.startswith(prefix))
               for prefix in ("captioner.vision_layers", "text_encoder.layers",
                              "captioner.decoder_layers")}
    other_alt = texts.clone()
    other_alt[:, 0, :3] = 9
    with torch.no_grad():
        moved = float(ov1(images, tokens, other_alt)["caption_loss"] - out["caption_loss"])
        no_prefix = OpenVision1(model, text_length=8, contrastive=False, text_prefix=False)
        unmoved = float(no_prefix(images, tokens, other_alt)["caption_loss"]
                        - no_prefix(images, tokens, texts)["caption_loss"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    extra = sum(p.numel() for n, p in ov1.named_parameters() if not n.startswith("captioner."))
    return dict(contrastive=(float(out["contrastive_loss"]), float(sum(clip) / 2)),
                reached=reached, moved=moved, unmoved=unmoved, extra=extra,
                text_params=count(ov1.text_encoder), captioner=count(ov1.captioner),
                ov2=count(ov2), ov2_boundary=count(ov2.caption_input),
                no_prefix_text=no_prefix.text_encoder, caption_positions=geom.text_len)


def check_global_contrastive():
    """Two gloo ranks, each scoring its half against the gathered batch (official
    local_loss): the mean of their losses and the sum of their feature gradients equal one
    process's loss and gradients over the whole batch."""
    import torch
    import torch.nn.functional as F

    from ov2_megatron.models.openvision1 import contrastive_loss

    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(3)
    image, t1, t2 = (F.normalize(torch.randn(8, 16, generator=gen), dim=-1) for _ in range(3))
    whole = [x.clone().requires_grad_() for x in (image, t1, t2)]
    full = contrastive_loss(whole[0], (whole[1], whole[2]), torch.tensor(10.0))
    full.backward()
    mine = [x[4 * rank:4 * rank + 4].clone().requires_grad_() for x in (image, t1, t2)]
    local = contrastive_loss(mine[0], (mine[1], mine[2]), torch.tensor(10.0),
                             group=torch.distributed.group.WORLD)
    (local / 2).backward()  # DDP averages the ranks' gradients
    mean = local.detach().clone()
    torch.distributed.all_reduce(mean)
    grads_match = all(torch.allclose(m.grad, w.grad[4 * rank:4 * rank + 4], atol=1e-6)
                      for m, w in zip(mine, whole))
    return float(mean / 2), float(full), grads_match


def compare_all():
    from ov2_megatron.data.config import DataConfig
    from ov2_megatron.perf import side_by_side
    from ov2_megatron.training.run_config import RunConfig, TrainConfig
    from tools.vs_reference import megatron_vs_reference

    run = RunConfig(model=tiny_model(), data=DataConfig(resolution=32, caption_length=12),
                    train=TrainConfig(global_batch=4, micro_batch=4, precision="fp32", seed=2))
    vs_reference = megatron_vs_reference(run, rounds=1)
    parts = check_ov1_parts()
    ov1_ov2 = side_by_side.ov1_vs_ov2(tiny_model(), batch=4, rounds=1, measure_memory=False,
                                      breakdown=True)
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
    assert parts["contrastive"][0] == pytest.approx(parts["contrastive"][1], rel=1e-5)
    # The contrastive loss trains both towers, not the caption decoder.
    assert parts["reached"] == {"captioner.vision_layers": True, "text_encoder.layers": True,
                                "captioner.decoder_layers": False}
    # The decoder reads the alt-text through its prefix, and through nothing else.
    assert abs(parts["moved"]) > 1e-6
    assert parts["unmoved"] == 0.0
    assert parts["no_prefix_text"] is None
    # The same ViT, decoder and head as OV2 (not its boundary, pooled LN); OV1 adds the text
    # tower, pooled norm, two heads, temperature, two projections and the queries.
    assert parts["captioner"] == parts["ov2"] - parts["ov2_boundary"] - 2 * 64  # its LN
    assert parts["extra"] == (parts["text_params"] + 2 * 64 + 64 * 48 + 48 * 48 + 1
                              + 64 * 48 + 48 * 48 + parts["caption_positions"] * 48)


def test_ov1_contrastive_loss_spans_the_global_batch():
    mean, full, grads_match = run_distributed(check_global_contrastive, 2)[0]
    assert mean == pytest.approx(full, rel=1e-6)
    assert grads_match


def test_ov1_prediction_at_the_paper_setting_is_pinned():
    """The analytic model at ViT-L/14 @ 224, 64 images per chip of a 2k batch, TPU-like
    accounting (docs/benchmarks/2026-12-02-ov1-vs-ov2-breakdown.md quotes these numbers)."""
    from ov2_megatron.perf.side_by_side import paper_l14, predicted_ov1_over_ov2

    paper = predicted_ov1_over_ov2(paper_l14(), 64, "tpu_paper", global_batch=2048)
    assert paper["memory_ratio"] == pytest.approx(1.94, abs=0.01)
    assert paper["flops_ratio"] == pytest.approx(1.33, abs=0.01)
    kinds = paper["kinds"]
    assert kinds["ov1"]["parts"]["contrastive"] < 0.001 * kinds["ov1"]["peak_bytes"]


def test_ov1_costs_more_than_ov2(compared):
    from ov2_megatron.perf import side_by_side

    timing, memory = compared[2], compared[3]
    print(f"tiny: OV1/OV2 time {timing['time_ratio']:.2f}x, memory "
          f"{memory['ov1']['peak_bytes'] / memory['ov2']['peak_bytes']:.2f}x")
    assert timing["parameters"]["ov1"] > timing["parameters"]["ov2"]
    assert set(timing["losses"]) == set(side_by_side.BREAKDOWN)
    assert all(len(losses) == 2 for losses in timing["losses"].values())
    assert len(timing["parts"]) == len(side_by_side.BREAKDOWN) - 1
    # Structural, not a timing claim: more weights, Adam state and activations.
    assert memory["ov1"]["peak_bytes"] > memory["ov2"]["peak_bytes"] > 0
