"""The megatron OpenVision 2 model equals the independent pure-PyTorch reference: loss and
every gradient, at TP=1, TP=2, TP=2+SP and PP=2 (the model split between encoder and decoder
stages, run by megatron's 1F1B schedule), for both decoder masks, learned positions and
registers, and with alignment padding in both sequences. (The reference itself is held to
the official code's numbers in tests/reference/test_official_fixture.py, and the model
directly by tools/check_official_parity.py in tests/model/test_official_parity.py.)

Each layout run returns its own weights (TP-gathered, standard names); the reference loads
exactly those, runs the same batch with the same kept-token indices, and must agree."""

import pytest
import torch

from tests.harness import run_distributed
from tests.reference.openvision2_reference import (DecoderConfig, OpenVision2Reference,
                                                   VisionConfig)

IMAGE, PATCH, VOCAB, CAPTION, BATCH, SEED = 32, 8, 100, 9, 4, 17


def tiny_config(mask: str, learned: bool, loss_kernel: str = "chunked", pad_multiple: int = 128):
    from ov2_megatron.config import DecoderConfig as Dec
    from ov2_megatron.config import ModelConfig, VisionConfig as Vis

    return ModelConfig(
        vision=Vis(variant="Ti/16", image_size=IMAGE, patch_size=PATCH, width=64, depth=3,
                   mlp_dim=128, num_heads=4, num_registers=1, keep_ratio=0.5,
                   pos_embed="learned" if learned else "sincos"),
        decoder=Dec(variant="B", width=48, depth=3, mlp_dim=96, num_heads=4, vocab_size=VOCAB,
                    vocab_pad_multiple=pad_multiple, loss_kernel=loss_kernel,
                    caption_length=CAPTION, pad_id=0, mask=mask,
                    pos_embed="learned" if learned else "none"),
        transformer_impl="local", init="megatron", init_std=0.05)


def batch(num_patches: int, num_kept: int):
    from ov2_megatron.models.token_drop import keep_indices

    gen = torch.Generator().manual_seed(SEED)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)
    tokens = torch.randint(1, VOCAB, (BATCH, CAPTION), generator=gen)
    tokens[1, 6:] = 0  # PAD tails carry no loss
    tokens[3, 4:] = 0
    keep = keep_indices(torch.arange(BATCH), num_patches, num_kept, seed=SEED)
    return images, tokens, keep


def megatron_run(tp: int, sp: bool, pp: int, mask: str, learned: bool, align: int | None,
                 loss_kernel: str = "chunked", pad_multiple: int = 128):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ov2_megatron.config import ParallelConfig, geometry, validate_model
    from ov2_megatron.models import state_dict_adapter
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from tests.distributed import tp_gather

    initialize(ParallelLayout(tensor=tp, pipeline=pp), seed=3)
    cfg = tiny_config(mask, learned, loss_kernel, pad_multiple)
    parallel = ParallelConfig(tensor=tp, pipeline=pp, sequence_parallel=sp)
    validate_model(cfg, parallel)
    geom = geometry(cfg, parallel, alignment=align)
    assert align is None or (geom.vit_seq > geom.vit_tokens and
                             geom.decoder_seq > geom.decoder_tokens)
    (chunk,) = build_chunks(cfg, parallel, geom)
    images, tokens, keep = batch(geom.num_patches, geom.num_kept)
    num_tokens = int((tokens[:, 1:] != 0).sum())
    weight = cfg.decoder.loss_weight
    micro = 2  # two micro-batches of two examples

    def forward_step(data_iterator, model):
        imgs, toks, kp = next(data_iterator)
        out = model(imgs, toks, kp)

        def loss_func(sums):
            # Per-token loss: megatron sums over micro-batches (calculate_per_token_loss);
            # we divide by the batch's caption-token count below, as finalize_model_grads does.
            loss = weight * sums["loss_sum"]
            return loss, sums["num_tokens"], {"loss": loss.detach(),
                                              "correct": sums["correct"].detach()}

        return out, loss_func

    micro_batches = [(images[i:i + micro], tokens[i:i + micro], keep[i:i + micro])
                     for i in range(0, BATCH, micro)]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=chunk,
        num_microbatches=len(micro_batches), seq_length=geom.decoder_seq, micro_batch_size=micro,
        forward_only=False)
    if sp:
        tp_gather.allreduce_sequence_parallel_grads(chunk)
    for param in chunk.parameters():
        if param.grad is not None:  # the frozen pooled LayerNorm has none
            param.grad /= num_tokens
    loss = correct = None
    if parallel_state.is_pipeline_last_stage():
        loss = sum(float(item["loss"]) for item in losses) / num_tokens
        correct = sum(int(item["correct"]) for item in losses)

    def standard(full):
        return state_dict_adapter.to_standard(full, chunk.plan, 4, 4, VOCAB)

    return dict(loss=loss, correct=correct, weights=standard(tp_gather.full_state(chunk)),
                grads=standard(tp_gather.full_state(chunk, grads=True)),
                registers=geom.num_registers, kept=geom.num_kept)


def reference_loss_and_grads(weights, registers, kept, mask, learned):
    vision = VisionConfig(image_size=IMAGE, patch_size=PATCH, width=64, depth=3, mlp_dim=128,
                          num_heads=4, num_registers=registers,
                          pos_embed="learned" if learned else "sincos")
    decoder = DecoderConfig(dec_width=48, dec_depth=3, dec_mlp_dim=96, dec_num_heads=4,
                            vocab_size=VOCAB, pad_id=0, mask=mask, loss_weight=2.0,
                            dec_pos_embed="learned" if learned else "none",
                            max_text_len=CAPTION)
    reference = OpenVision2Reference(vision, decoder)
    state = reference.state_dict()
    for name, value in weights.items():
        if name == "decoder.pos_embed":  # ours covers the k + t positions actually used
            state[name][: value.shape[0]] = value
        else:
            assert state[name].shape == value.shape, name
            state[name] = value
    assert state.keys() == weights.keys()
    reference.load_state_dict(state)
    images, tokens, keep = batch(reference.vision.cfg.num_patches, kept)
    out = reference(images, tokens, keep)
    out["loss"].backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    return float(out["loss"]), grads


LAYOUTS = {
    "tp1": dict(world=1, tp=1, sp=False, pp=1, align=None),
    # 18 ViT tokens -> 24, 16 decoder positions -> 24: padding in both sequences
    "tp1_padded": dict(world=1, tp=1, sp=False, pp=1, align=12),
    "tp2": dict(world=2, tp=2, sp=False, pp=1, align=None),
    "tp2_sp": dict(world=2, tp=2, sp=True, pp=1, align=None),
    "pp2": dict(world=2, tp=1, sp=False, pp=2, align=None),
}


@pytest.mark.parametrize("layout,mask,learned", [
    ("tp1", "causal", False), ("tp1", "prefix", True), ("tp1_padded", "prefix", True),
    ("tp2", "causal", False), ("tp2_sp", "prefix", True), ("pp2", "causal", False),
])
def test_megatron_model_equals_reference(layout, mask, learned):
    spec = LAYOUTS[layout]
    ranks = run_distributed(megatron_run, spec["world"],
                            args=(spec["tp"], spec["sp"], spec["pp"], mask, learned,
                                  spec["align"]))
    weights, grads = {}, {}
    for rank in ranks:  # PP stages hold disjoint parameters; TP ranks hold full copies
        weights.update(rank["weights"])
        grads.update(rank["grads"])
    loss = [r["loss"] for r in ranks if r["loss"] is not None][0]
    ref_loss, ref_grads = reference_loss_and_grads(
        weights, ranks[0]["registers"], ranks[0]["kept"], mask, learned)
    assert ref_loss > 1.0
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() <= ref_grads.keys()
    for name, grad in grads.items():
        want = ref_grads[name]
        if want is None:  # the pooled LayerNorm: the caption loss never reaches it
            assert name.startswith("vision.norm.") and grad.abs().max() == 0, name
            continue
        if name == "decoder.pos_embed":
            want = want[: grad.shape[0]]
        assert want.abs().max() > 0 or "qkv.bias" in name, name
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout,pad_multiple", [
    ("tp1", 128), ("tp2", 128), ("tp2_sp", 128), ("pp2", 128),
    ("tp2", 256),  # TP rank 1 holds vocabulary rows 128-255: padding only, no real row
])
def test_chunked_loss_equals_the_plain_head(layout, pad_multiple):
    """decoder.loss_kernel: the chunked vocab-parallel linear + cross-entropy (the default)
    against megatron's plain head (fp32 logits, vocab_parallel_cross_entropy, padding rows
    masked to -inf): the same loss, token accuracy and every gradient."""
    spec = LAYOUTS[layout]
    results = {}
    for kernel in ("plain", "chunked"):
        ranks = run_distributed(megatron_run, spec["world"],
                                args=(spec["tp"], spec["sp"], spec["pp"], "causal", False,
                                      spec["align"], kernel, pad_multiple))
        grads = {}
        for rank in ranks:
            grads.update(rank["grads"])
        last = [r for r in ranks if r["loss"] is not None][0]
        results[kernel] = (last["loss"], last["correct"], grads)
    (plain_loss, plain_correct, plain_grads), (loss, correct, grads) = results.values()
    assert plain_loss > 1.0 and loss == pytest.approx(plain_loss, rel=1e-6)
    assert correct == plain_correct
    assert grads.keys() == plain_grads.keys()
    head = [name for name in grads if "head" in name or "output" in name]
    assert head, sorted(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")
