"""OpenCLIP -> megatron (TP=2) -> timm, with the real open_clip_torch building and saving the
source model, and the refusals of what our encoder cannot represent.

The source is an OpenCLIP ViT configured like the released OpenVision checkpoints (the
official repository's model_configs/openvision-vit-*.json, at tiny widths): `no_ln_pre`,
`pool_type: "avg"`, `final_ln_after_pool`, LayerNorm eps 1e-6, exact GELU (tanh only in the
text tower), vision-only `visual.*` weights, big_vision sin-cos patch positions; plus layer
scale and a non-zero CLS position row so the folding paths are exercised. open_clip's tokens
(output_tokens=True: the raw last block without CLS) and pooled feature (ln_post of their
mean, before proj) must equal encode()'s and the timm export's."""

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests.conversion.conftest import assert_features_close, run_tools, third_party

WIDTH, LAYERS, HEAD_WIDTH, PATCH = 128, 2, 32, 8


def openclip_config(image_size: int, **vision) -> dict:
    vision_cfg = dict(image_size=image_size, patch_size=PATCH, width=WIDTH, layers=LAYERS,
                      head_width=HEAD_WIDTH, no_ln_pre=True, pool_type="avg",
                      final_ln_after_pool=True, norm_kwargs={"eps": 1e-6}, ls_init_value=0.5)
    vision_cfg.update(vision)
    text_cfg = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1,
                    act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6})
    return dict(model_cfg=dict(embed_dim=64, quick_gelu=False, vision_cfg=vision_cfg,
                               text_cfg=text_cfg),
                preprocess_cfg=dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]))


def test_openclip_to_megatron_tp2_to_timm(pixels, convert_python, tmp_path):
    size = np.load(pixels).shape[-1]
    source = tmp_path / "openclip"
    source.mkdir()
    (source / "open_clip_config.json").write_text(json.dumps(openclip_config(size)))
    reference, = third_party(convert_python, ("openclip-make", str(source), pixels,
                                              str(tmp_path / "openclip_out"),
                                              "--big-vision-sincos"))
    assert reference["info"]["ln_pre"] == "Identity"
    assert (reference["info"]["pool_type"], reference["info"]["final_ln_after_pool"]) == \
        ("avg", True)
    assert "visual.transformer.resblocks.0.ls_1.gamma" in reference["info"]["tensors"]
    run_dir, timm_dir = str(tmp_path / "imported"), str(tmp_path / "timm")
    ours_file = str(tmp_path / "ours.safetensors")
    results = run_tools(
        ("convert_checkpoint", ["import-openclip", "--input", str(source), "--output", run_dir,
                                "--tp", "2", "--pp", "1", "--recipe", "tiny_cpu", "--stage",
                                "1"]),
        ("convert_checkpoint", ["export-timm", "--checkpoint", run_dir, "--output", timm_dir]),
        ("extract_features", ["--checkpoint", run_dir, "--pixels", pixels, "--output",
                              ours_file, "--no-progress"]))
    assert "proj (128, 64)" in results[0][1] and "python -m ov2_megatron.train" in results[0][1]
    with open(os.path.join(run_dir, "config.json")) as f:
        run = json.load(f)
    vision = run["model"]["vision"]
    assert (vision["width"], vision["depth"], vision["num_heads"], vision["pos_embed"]) == \
        (WIDTH, LAYERS, WIDTH // HEAD_WIDTH, "sincos")
    assert run["model"]["layernorm_eps"] == 1e-6 and run["parallel"]["tensor"] == 2
    assert run["data"]["mean"] == [0.5, 0.4, 0.3]
    with open(os.path.join(run_dir, "checkpoints", "step_00000000", "meta.json")) as f:
        assert json.load(f)["layout"]["imported"] is True
    ours = load_file(ours_file)
    timm, = third_party(convert_python, ("timm", timm_dir, pixels, str(tmp_path / "timm_out")))
    diffs = (assert_features_close(ours, reference, "ours vs open_clip"),
             assert_features_close(timm, reference, "timm vs open_clip"),
             assert_features_close(timm, reference, "penultimate block, timm vs open_clip",
                                   names=("penultimate",)))
    print("OpenCLIP -> TP=2 -> timm max |diff|: ours {:.2e}, timm {:.2e}, timm penultimate "
          "{:.2e}".format(*diffs))


def _visual_state(grid: int, ln_pre: bool = False) -> dict[str, torch.Tensor]:
    """A hand-made OpenCLIP visual state dict (names and shapes of open_clip's ViT)."""
    gen = torch.Generator().manual_seed(0)
    w, m = WIDTH, 4 * WIDTH
    state = {"conv1.weight": (w, 3, PATCH, PATCH), "class_embedding": (w,),
             "positional_embedding": (grid * grid + 1, w), "ln_post.weight": (w,),
             "ln_post.bias": (w,), "proj": (w, 64)}
    for i in range(LAYERS):
        prefix = f"transformer.resblocks.{i}."
        state.update({prefix + k: s for k, s in {
            "ln_1.weight": (w,), "ln_1.bias": (w,), "attn.in_proj_weight": (3 * w, w),
            "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
            "attn.out_proj.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
            "mlp.c_fc.weight": (m, w), "mlp.c_fc.bias": (m,), "mlp.c_proj.weight": (w, m),
            "mlp.c_proj.bias": (w,)}.items()})
    if ln_pre:
        state.update({"ln_pre.weight": (w,), "ln_pre.bias": (w,)})
    return {f"visual.{k}": torch.randn(s, generator=gen) for k, s in state.items()}


def _write(directory, config: dict, state) -> str:
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(state, directory / "open_clip_pytorch_model.bin")
    return str(directory)


REFUSALS = {  # case: (vision_cfg / model_cfg change, the reason the error must name)
    "ln_pre": ({}, "visual.ln_pre is a LayerNorm before the blocks"),
    "no_ln_pre_unset": ({"no_ln_pre": False}, "no_ln_pre is not set: OpenCLIP applies ln_pre"),
    "pool_tok": ({"pool_type": "tok"}, "pool_type 'tok': this model's pooled feature is "
                                       "LN(mean of the patch tokens)"),
    "ln_post_on_tokens": ({"final_ln_after_pool": False}, "final_ln_after_pool is not set: "
                          "OpenCLIP applies ln_post to every token"),
    "attentional_pool": ({"attentional_pool": True}, "attentional_pool: no counterpart"),
    "tanh_gelu": ({"act_kwargs": {"approximate": "tanh"}},
                  "act_kwargs {'approximate': 'tanh'}: this model uses exact GELU"),
    "quick_gelu": ({}, "quick_gelu: this model uses exact GELU"),
    "missing": ({}, "visual.transformer.resblocks.1.mlp.c_fc.weight (512, 128) missing"),
    "shape": ({}, "visual.positional_embedding has shape (17, 128), the config needs (37, 128)"),
    "truncated": ({}, "open_clip_pytorch_model.bin: cannot read the weights"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_openclip_import_refuses_what_it_cannot_represent(tmp_path, case):
    from ov2_megatron.conversion import ConversionError, openclip_format

    vision_change, message = REFUSALS[case]
    config, grid = openclip_config(48, **vision_change), 6
    state = _visual_state(grid, ln_pre=case == "ln_pre")
    if case == "quick_gelu":
        config["model_cfg"]["quick_gelu"] = True
    if case == "missing":
        del state["visual.transformer.resblocks.1.mlp.c_fc.weight"]
    if case == "shape":
        state["visual.positional_embedding"] = torch.zeros(17, WIDTH)
    source = _write(tmp_path / case, config, state)
    if case == "truncated":
        path = os.path.join(source, "open_clip_pytorch_model.bin")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ConversionError, match=re.escape(message)):
        openclip_format.read(source)


def test_openclip_import_maps_a_hand_made_checkpoint_exactly(tmp_path):
    """Without the third-party venv: CLS row folded, layer scale folded, proj and the
    OpenVision fork's proj_bias dropped, ln_post -> the pooled norm, text tower ignored,
    learned positions kept."""
    from ov2_megatron.conversion import openclip_format

    config = openclip_config(48)
    state = _visual_state(6)
    gamma = torch.full((WIDTH,), 0.5)
    state["visual.transformer.resblocks.0.ls_1.gamma"] = gamma
    state["text.token_embedding.weight"] = torch.zeros(64, 32)
    state["visual.proj_bias"] = torch.zeros(64)
    vision = openclip_format.read(_write(tmp_path / "src", config, state))
    std = vision.standard
    torch.testing.assert_close(std["vision.cls_token"], state["visual.class_embedding"]
                               + state["visual.positional_embedding"][0], rtol=0, atol=0)
    torch.testing.assert_close(std["vision.pos_embed"], state["visual.positional_embedding"][1:],
                               rtol=0, atol=0)
    torch.testing.assert_close(std["vision.blocks.0.attn.proj.bias"],
                               0.5 * state["visual.transformer.resblocks.0.attn.out_proj.bias"])
    torch.testing.assert_close(std["vision.norm.weight"], state["visual.ln_post.weight"],
                               rtol=0, atol=0)
    assert vision.pos_embed == "learned" and vision.layernorm_eps == 1e-6
    assert not any(k.startswith("decoder") for k in std) and len(std) == 5 + 12 * LAYERS
    assert any("1 tensors outside the vision tower" in n for n in vision.notes)
    assert any(n.startswith("proj (128, 64), proj_bias (64,)") for n in vision.notes)
