"""Self-tests of the OpenVision 2 reference: each checks a number, not just a shape.

The reference is what the megatron model is proven equal to, so its own correctness is
checked here against hand computations, direct formulas and invariances of the masks.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from tests.reference.openvision2_reference import (
    DecoderConfig,
    OpenVision2Reference,
    VisionConfig,
    VisionEncoder,
    caption_loss,
    parameter_count,
    posemb_sincos_2d,
    random_keep_indices,
)

BOS, EOS, PAD = 1, 2, 0


def tiny_model(seed=0, std=0.02, **overrides) -> OpenVision2Reference:
    """8x8 images, patch 4 -> N=4 patches; widths of 8 keep gradcheck fast."""
    torch.manual_seed(seed)
    vision = dict(image_size=8, patch_size=4, width=8, depth=2, mlp_dim=16, num_heads=2)
    decoder = dict(dec_width=8, dec_depth=2, dec_mlp_dim=16, dec_num_heads=2, vocab_size=11, pad_id=PAD)
    for key, value in overrides.items():
        (vision if key in VisionConfig.__dataclass_fields__ else decoder)[key] = value
    model = OpenVision2Reference(vision, decoder)
    if std != 0.02:
        # larger weights make logits far from uniform, so greedy decoding is not a coin toss
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(std=std)
    return model


def images(b=2, seed=1, dtype=torch.float32):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_sincos_table_matches_per_element_formula():
    grid, width = 3, 12
    table = posemb_sincos_2d(grid, width, dtype=torch.float64)
    q = width // 4
    for n in range(grid * grid):
        y, x = divmod(n, grid)  # row-major: row index major, column minor
        for j in range(q):
            omega = 1.0 / 10000 ** (j / (q - 1))
            expected = [math.sin(x * omega), math.cos(x * omega), math.sin(y * omega), math.cos(y * omega)]
            got = [table[n, k * q + j].item() for k in range(4)]
            assert got == pytest.approx(expected, abs=1e-15)


def test_patch_order_is_row_major_and_positions_only_on_patches():
    enc = VisionEncoder(VisionConfig(image_size=8, patch_size=4, width=8, depth=0, mlp_dim=8, num_heads=2))
    img = images()
    x = enc.embed(img)  # [B, 4, 8]
    w = enc.patch_embed.weight  # [8, 3, 4, 4]
    pos = posemb_sincos_2d(2, 8)
    for i in range(2):
        for j in range(2):
            crop = img[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]  # [B, 3, 4, 4]
            direct = torch.einsum("bchw,ochw->bo", crop, w) + pos[2 * i + j]
            torch.testing.assert_close(x[:, 2 * i + j], direct)
    # depth 0: the patch tokens come out raw (CLS dropped, no LayerNorm on them); the pooled
    # feature is the LayerNorm of their mean (official pool_type "gap" + encoder_norm)
    patches, pooled = enc.encode(img)
    torch.testing.assert_close(patches, x)
    torch.testing.assert_close(pooled, enc.norm(x.mean(dim=1)))


def test_wrong_image_size_and_bad_tokens_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="image_size"):
        model.vision.encode(torch.zeros(1, 3, 8, 12))
    with pytest.raises(ValueError, match="vocab_size"):
        model(images(1), torch.tensor([[BOS, 11, EOS]]))
    with pytest.raises(ValueError, match="num_heads"):
        VisionConfig(image_size=8, patch_size=4, width=10, depth=1, mlp_dim=8, num_heads=3).validate()


def test_registers_removed_and_mean_pooling_without_cls():
    model = tiny_model(class_token=False, num_registers=3)
    patches, pooled = model.vision.encode(images())
    assert patches.shape == (2, 4, 8)
    torch.testing.assert_close(pooled, model.vision.norm(patches.mean(dim=1)))
    assert model.vision.cls_token is None and model.vision.registers.shape == (3, 8)


def test_gelu_forms_match_their_definitions():
    from tests.reference.openvision2_reference import gelu

    h = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(gelu(h, "none"), F.gelu(h))
    torch.testing.assert_close(gelu(h, "tanh"), F.gelu(h, approximate="tanh"))
    assert (gelu(h, "none") - gelu(h, "tanh")).abs().max() > 1e-4  # they are different functions


def test_keep_indices_gather_in_given_order():
    g = torch.Generator().manual_seed(0)
    idx = random_keep_indices(3, 16, 0.35, g)
    assert idx.shape == (3, 5)  # int(16 * 0.35) = 5
    assert all(len(set(row.tolist())) == 5 for row in idx) and 0 <= idx.min() and idx.max() < 16
    model = tiny_model()
    img = images()
    patches, _ = model.vision.encode(img)
    keep = torch.tensor([[3, 0], [1, 2]])
    expected = model.decoder.img_proj(torch.stack([patches[0, [3, 0]], patches[1, [1, 2]]]))
    torch.testing.assert_close(model.kept_tokens(img, keep), expected)
    # None keeps every patch in order
    torch.testing.assert_close(model.kept_tokens(img, None), model.decoder.img_proj(patches))


def _decoder_states(model, img, text):
    return model.decoder.hidden(img, text)  # [B, K+T, D]


def test_causal_mask_first_image_token_ignores_later_tokens():
    model = tiny_model(mask="causal", std=0.5)
    img, text = torch.randn(2, 3, 8), torch.randint(3, 11, (2, 4))
    base = _decoder_states(model, img, text)
    # random (not constant) shifts: LayerNorm would erase a constant added to a token
    img2, text2 = img + torch.randn_like(img), torch.randint(3, 11, (2, 4))
    img2[:, 0] = img[:, 0]
    other = _decoder_states(model, img2, text2)
    torch.testing.assert_close(other[:, 0], base[:, 0])
    assert (other[:, 1:] - base[:, 1:]).abs().max() > 1e-3


def test_prefix_mask_image_tokens_see_each_other_but_not_text():
    model = tiny_model(mask="prefix", std=0.5)
    img, text = torch.randn(2, 3, 8), torch.randint(3, 11, (2, 4))
    base = _decoder_states(model, img, text)
    img2 = img.clone()
    img2[:, 2] += torch.randn(2, 8)
    assert (_decoder_states(model, img2, text)[:, 0] - base[:, 0]).abs().max() > 1e-3
    other = _decoder_states(model, img, torch.randint(3, 11, (2, 4)))
    torch.testing.assert_close(other[:, :3], base[:, :3])


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_text_is_causal_in_both_masks(mask):
    model = tiny_model(mask=mask)
    img, text = torch.randn(2, 3, 8), torch.randint(3, 11, (2, 5))
    base = model.decoder.text_logits(img, text)
    text2 = text.clone()
    text2[:, 3:] = torch.randint(3, 11, (2, 2))
    torch.testing.assert_close(model.decoder.text_logits(img, text2)[:, :3], base[:, :3])


def _mask_difference(dec_depth, num_image):
    """|causal - prefix| decoder states, same weights and inputs -> [B, K+T, D]."""
    causal = tiny_model(mask="causal", dec_depth=dec_depth, std=0.5)
    prefix = tiny_model(mask="prefix", dec_depth=dec_depth)
    prefix.load_state_dict(causal.state_dict())
    img, text = torch.randn(2, num_image, 8), torch.randint(3, 11, (2, 4))
    return (causal.decoder.hidden(img, text) - prefix.decoder.hidden(img, text)).abs()


def test_masks_differ_only_where_visibility_differs():
    # one image token: the two masks are the same matrix
    assert _mask_difference(dec_depth=2, num_image=1).max() == 0
    # one layer, 3 image tokens: only image rows 0 and 1 gain keys under prefix; the last
    # image token and all text tokens see every image token under both masks
    diff = _mask_difference(dec_depth=1, num_image=3)
    assert diff[:, 0].max() > 1e-3 and diff[:, 1].max() > 1e-3
    assert diff[:, 2:].max() < 1e-6
    # two layers: text reads image states that the first layer already made differ
    assert _mask_difference(dec_depth=2, num_image=3)[:, 3:].max() > 1e-3


def test_loss_equals_hand_computed_cross_entropy():
    model = tiny_model(loss_weight=2.0)
    tokens = torch.tensor([[BOS, 5, 6, EOS, PAD], [BOS, 7, EOS, PAD, PAD]])
    out = model(images(), tokens, keep_idx=torch.tensor([[0, 3], [2, 1]]))
    logits = out["logits"].tolist()
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            label = tokens[b, t + 1].item()
            if label == PAD:
                continue
            row = logits[b][t]
            total += math.log(sum(math.exp(z) for z in row)) - row[label]
            count += 1
    assert count == 5 and out["num_tokens"].item() == 5
    assert out["caption_loss"].item() == pytest.approx(total / count, rel=1e-6)
    assert out["loss"].item() == pytest.approx(2.0 * total / count, rel=1e-6)
    labels = tokens[:, 1:]
    hits = ((out["logits"].argmax(-1) == labels) & (labels != PAD)).sum().item()
    assert out["token_accuracy"].item() == pytest.approx(hits / 5)


def test_loss_ignores_pad_positions():
    labels = torch.tensor([[5, 6, EOS, PAD], [EOS, PAD, PAD, PAD]])
    logits = torch.randn(2, 4, 11)
    base = caption_loss(logits, labels, PAD)["caption_loss"]
    noisy = logits.clone()
    noisy[labels == PAD] += 10 * torch.randn_like(noisy[labels == PAD])
    torch.testing.assert_close(caption_loss(noisy, labels, PAD)["caption_loss"], base)
    # mean over the 4 valid tokens of the batch, not the mean of the two row means
    nll = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="none").view(2, 4)
    torch.testing.assert_close(base, (nll[0, :3].sum() + nll[1, 0]) / 4)
    # extra trailing PAD changes nothing in the full model
    model = tiny_model()
    short = torch.tensor([[BOS, 5, 6, EOS], [BOS, 7, EOS, PAD]])
    longer = F.pad(short, (0, 3), value=PAD)
    a, b = model(images(), short), model(images(), longer)
    for key in ("loss", "num_tokens", "token_accuracy"):
        torch.testing.assert_close(a[key], b[key])


def test_greedy_generation_equals_argmax_of_full_forward():
    model = tiny_model(std=1.0, vocab_size=8, seed=4)
    img = images(6, seed=4)
    seq = model.generate(img, None, bos_id=BOS, eos_id=EOS, max_len=7)
    assert seq.shape[0] == 6 and seq.shape[1] <= 7 and (seq[:, 0] == BOS).all()
    tokens = F.pad(seq, (0, 1), value=PAD)  # forward predicts tokens[:, 1:] from tokens[:, :-1]
    with torch.no_grad():
        logits = model(img, tokens)["logits"]  # [B, len, V]
    stopped = 0
    for b in range(6):
        row = seq[b].tolist()
        end = row.index(EOS) if EOS in row else len(row) - 1
        stopped += EOS in row
        for t in range(end):
            assert logits[b, t].argmax().item() == row[t + 1]
        assert all(tok == PAD for tok in row[end + 1 :])
    assert 0 < stopped < 6  # this seed has rows that stop at EOS and rows that run to max_len


def test_generation_stops_when_all_rows_emit_eos():
    model = tiny_model()
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.weight[EOS] = 1.0
        model.decoder.norm.bias.fill_(1.0)  # EOS logit = sum(hidden) > 0 = every other logit
    seq = model.generate(images(), torch.tensor([[0, 1], [2, 3]]), BOS, EOS, max_len=9)
    assert seq.tolist() == [[BOS, EOS], [BOS, EOS]]


def test_gradcheck_float64_all_parameters():
    model = tiny_model(
        num_registers=1, pos_embed="learned", mask="prefix", dec_pos_embed="learned", max_text_len=5, depth=1, dec_depth=1
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # move off zero biases / unit scales
    tokens = torch.tensor([[BOS, 5, 6, EOS, PAD], [BOS, 7, EOS, PAD, PAD]])
    keep = torch.tensor([[3, 0, 2], [1, 2, 0]])
    names = [n for n, _ in model.named_parameters()]

    def loss(img, *params):
        return functional_call(model, dict(zip(names, params)), (img, tokens, keep))["loss"]

    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    img = images(dtype=torch.float64).requires_grad_()
    # fast mode checks a random directional derivative of each input tensor separately:
    # every parameter is covered at ~2 forwards per tensor instead of 2 per element
    assert torch.autograd.gradcheck(loss, (img, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


REFERENCE_SIZES = {  # name: (width, depth, mlp, heads), published size, tolerance
    "L/14": ((1024, 24, 4096, 16), 304e6, 0.01),
    "So400m/14": ((1152, 27, 4304, 16), 400e6, 0.07),  # "400m" is a rounded name; 412M here (no MAP head)
    "H/14": ((1280, 32, 5120, 16), 632e6, 0.01),
    "g/14": ((1408, 40, 6144, 16), 1.011e9, 0.01),
}


@pytest.mark.parametrize("name", list(REFERENCE_SIZES))
def test_parameter_counts_on_meta_device(name):
    (width, depth, mlp, heads), published, tol = REFERENCE_SIZES[name]
    cfg = VisionConfig(image_size=224, patch_size=14, width=width, depth=depth, mlp_dim=mlp, num_heads=heads)
    encoder = VisionEncoder(cfg, device=torch.device("meta"))
    count = parameter_count(encoder)
    print(f"{name}: {count:,} parameters ({count / published - 1:+.2%} vs {published:,.0f})")
    assert next(encoder.parameters()).is_meta
    assert abs(count / published - 1) < tol
