"""Runs INSIDE .venv-convert (torch 2.14 + torchvision + timm + transformers + open_clip, see
`make convert-env`), never in the main venv: it loads exported models with the real
third-party packages, or builds an OpenCLIP model and saves it in the released format.

    python third_party_features.py --job LIBRARY MODEL_DIR PIXELS.npy OUT_DIR [--job ...]

LIBRARY is timm, hf (TimmWrapperModel) or hf-vit (ViTModel / Dinov2WithRegistersModel), which
load the exported MODEL_DIR, or openclip-make (MODEL_DIR holds open_clip_config.json; the model
is built, randomised and saved there as open_clip_pytorch_model.bin), or timm-image, hf-image,
hf-pil-image, openclip-image, where PIXELS is an image file that the library's own
preprocessing turns into pixels (saved as pixels.npy too). Several jobs share one
process (one torch import). Each job writes, in OUT_DIR, the official features as that library
exposes them, patch_tokens.npy [N, patches, w] (raw output of the last block) and pooled.npy
[N, w], penultimate.npy [N, patches, w] (the block before the last, what LLaVA's default
mm_vision_select_layer=-2 takes), hf-vit also last_hidden_state.npy and pooler_output.npy,
and info.json. Self-contained: nothing of ov2_megatron is imported here.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def timm_features(model_dir: str, pixels: torch.Tensor):
    import timm

    # pretrained=True loads model.safetensors strictly: a missing or extra tensor raises.
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    with torch.no_grad():
        features = model.forward_features(pixels)
        pooled = model.forward_head(features, pre_logits=True)
        # the last two blocks' outputs, prefix tokens dropped: [0] is the penultimate block
        penultimate = model.forward_intermediates(pixels, indices=2, output_fmt="NLC",
                                                  intermediates_only=True)[0]
    info = dict(library=f"timm {timm.__version__}", model_class=type(model).__name__,
                num_prefix_tokens=model.num_prefix_tokens, norm=type(model.norm).__name__,
                fc_norm=type(model.fc_norm).__name__)
    return dict(patch_tokens=features[:, model.num_prefix_tokens:], pooled=pooled,
                penultimate=penultimate), info


def _load_hf(model_dir: str):
    """AutoModel, refusing a load that left any tensor missing, unexpected or mismatched."""
    import transformers
    from transformers import AutoImageProcessor, AutoModel

    model, loading = AutoModel.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: v for k, v in loading.items() if v}
    if problems:
        raise SystemExit(f"transformers did not load every tensor exactly: {problems}")
    processor = AutoImageProcessor.from_pretrained(model_dir)
    config = getattr(processor, "data_config", None)  # TimmWrapperImageProcessor
    mean = config["mean"] if config else processor.image_mean
    std = config["std"] if config else processor.image_std
    info = dict(library=f"transformers {transformers.__version__}",
                model_class=type(model).__name__, processor=type(processor).__name__,
                image_mean=list(mean), image_std=list(std))
    return model.eval(), info


def hf_timm_wrapper_features(model_dir: str, pixels: torch.Tensor):
    """TimmWrapperModel: its outputs are the official features."""
    from safetensors.torch import load_file

    model, info = _load_hf(model_dir)
    loaded = model.state_dict()
    written = load_file(os.path.join(model_dir, "model.safetensors"))
    altered = [k for k, v in written.items() if not torch.equal(loaded[f"timm_model.{k}"], v)]
    if altered or len(loaded) != len(written):
        raise SystemExit(f"TimmWrapperModel holds {len(loaded)} tensors for {len(written)} "
                         f"written; altered on load: {altered[:8]}")
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    prefix = model.timm_model.num_prefix_tokens
    patches = out.last_hidden_state[:, prefix:]
    # timm's intermediates: [b, w, g, g] per block, prefix tokens dropped
    last, penultimate = (h.flatten(2).transpose(1, 2) for h in out.hidden_states[-1:-3:-1])
    info.update(num_prefix_tokens=prefix, num_hidden_states=len(out.hidden_states),
                hidden_states_last_vs_tokens=float((last - patches).abs().max()))
    return dict(patch_tokens=patches, pooled=out.pooler_output, penultimate=penultimate), info


def hf_native_features(model_dir: str, pixels: torch.Tensor):
    """ViTModel / Dinov2WithRegistersModel: the official features are hidden_states[-1] and
    layernorm(its mean); last_hidden_state and pooler_output are saved to show they differ."""
    model, info = _load_hf(model_dir)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        prefix = 1 + getattr(model.config, "num_register_tokens", 0)
        last = out.hidden_states[-1]
        patches = last[:, prefix:]
        pooled = model.layernorm(patches.mean(dim=1))
        info.update(
            num_prefix_tokens=prefix, num_hidden_states=len(out.hidden_states),
            last_hidden_state_vs_layernorm_of_every_token=float(
                (out.last_hidden_state - model.layernorm(last)).abs().max()),
            pooler_output_vs_layernorm_of_cls=float(
                (out.pooler_output - model.layernorm(last[:, 0])).abs().max()))
    return dict(patch_tokens=patches, pooled=pooled,
                penultimate=out.hidden_states[-2][:, prefix:],
                last_hidden_state=out.last_hidden_state[:, prefix:],
                pooler_output=out.pooler_output), info


def big_vision_sincos(grid: int, width: int) -> np.ndarray:
    """big_vision's posemb_sincos_2d, [grid*grid, width] = [sin x, cos x, sin y, cos y]."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / (quarter - 1))
    y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                       indexing="ij")
    x, y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


def randomize(visual: torch.nn.Module, seed: int, sincos_grid: int | None) -> None:
    """Non-trivial values everywhere (LayerNorm scales around one, biases, layer scales, the
    CLS position row), so a dropped or swapped tensor changes the features."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in visual.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if ".ln_" in name or name.startswith("ln_") or name.endswith("gamma"):
                value = 1.0 + 0.2 * noise if name.endswith(("weight", "gamma")) else 0.2 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif name in ("class_embedding", "positional_embedding"):
                value = 0.5 * noise
            else:
                value = noise * (param[0].numel() ** -0.5)
            param.copy_(value)
        if sincos_grid:  # the patch rows of a big_vision model converted to OpenCLIP
            table = big_vision_sincos(sincos_grid, visual.positional_embedding.shape[1])
            visual.positional_embedding[1:] = torch.from_numpy(table).float()


def openclip_make(model_dir: str, pixels: torch.Tensor, seed: int, sincos: bool):
    import open_clip

    with open(os.path.join(model_dir, "open_clip_config.json")) as f:
        vision_cfg = json.load(f)["model_cfg"]["vision_cfg"]
    model = open_clip.create_model(f"local-dir:{model_dir}").eval()
    visual = model.visual
    grid = vision_cfg["image_size"] // vision_cfg["patch_size"]
    randomize(visual, seed, grid if sincos else None)
    # The vision-only release format: the visual tower's tensors under "visual.".
    state = {f"visual.{k}": v.clone() for k, v in visual.state_dict().items()}
    torch.save(state, os.path.join(model_dir, "open_clip_pytorch_model.bin"))
    visual.output_tokens, visual.proj = True, None  # features before the projection
    with torch.no_grad():
        pooled, tokens = visual(pixels)
        penultimate = visual.forward_intermediates(pixels, indices=2, output_fmt="NLC",
                                                   intermediates_only=True)
    info = dict(library=f"open_clip {open_clip.__version__}", model_class=type(visual).__name__,
                tensors=sorted(state), ln_pre=type(visual.ln_pre).__name__,
                pool_type=visual.pool_type, final_ln_after_pool=visual.final_ln_after_pool)
    return dict(patch_tokens=tokens, pooled=pooled,
                penultimate=penultimate["image_intermediates"][0]), info


def _open_image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _hf_features(model_dir: str, pixels: torch.Tensor):
    with open(os.path.join(model_dir, "config.json")) as f:
        timm_wrapper = json.load(f).get("model_type") == "timm_wrapper"
    return (hf_timm_wrapper_features if timm_wrapper else hf_native_features)(model_dir, pixels)


def image_features(library: str, model_dir: str, image_path: str):
    """LIBRARY-image jobs: the image file preprocessed by the library's OWN pipeline, then its
    model: timm (resolve_data_config + create_transform), hf / hf-pil (AutoImageProcessor of
    the folder, default or PIL backend), openclip (open_clip's eval transform built from the
    preprocess_cfg in MODEL_DIR/open_clip_preprocess.json; features by the timm model there)."""
    image = _open_image(image_path)
    if library == "timm-image":
        import timm
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
        data_config = resolve_data_config({}, model=model)
        pixels = create_transform(**data_config)(image).unsqueeze(0)
        arrays, info = timm_features(model_dir, pixels)
        info["data_config"] = {k: list(v) if isinstance(v, tuple) else v
                               for k, v in data_config.items()}
    elif library in ("hf-image", "hf-pil-image"):
        from transformers import AutoImageProcessor

        backend = "pil" if library == "hf-pil-image" else None
        processor = AutoImageProcessor.from_pretrained(model_dir, backend=backend)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        arrays, info = _hf_features(model_dir, pixels)
        info["processor"] = type(processor).__name__
    elif library == "openclip-image":
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        with open(os.path.join(model_dir, "open_clip_preprocess.json")) as f:
            cfg = json.load(f)
        pixels = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(image).unsqueeze(0)
        arrays, info = timm_features(model_dir, pixels)
        info["open_clip"] = open_clip.__version__
    else:
        raise SystemExit(f"unknown library {library!r}")
    arrays["pixels"] = pixels
    return arrays, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", nargs=4, action="append", required=True,
                        metavar=("LIBRARY", "MODEL_DIR", "PIXELS", "OUT_DIR"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big-vision-sincos", action="store_true",
                        help="openclip-make: big_vision's sin-cos table in the patch rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    readers = {"timm": timm_features, "hf": hf_timm_wrapper_features, "hf-vit": hf_native_features}
    for library, model_dir, pixels_path, out_dir in args.job:
        if library.endswith("-image"):
            arrays, info = image_features(library, model_dir, pixels_path)
        elif library in readers:
            pixels = torch.from_numpy(np.load(pixels_path))
            arrays, info = readers[library](model_dir, pixels)
        elif library == "openclip-make":
            pixels = torch.from_numpy(np.load(pixels_path))
            arrays, info = openclip_make(model_dir, pixels, args.seed, args.big_vision_sincos)
        else:
            raise SystemExit(f"unknown library {library!r}: use {', '.join(readers)} or "
                             "openclip-make")
        os.makedirs(out_dir, exist_ok=True)
        for name, value in arrays.items():
            np.save(os.path.join(out_dir, f"{name}.npy"), value.float().numpy())
        info["torch"] = torch.__version__
        with open(os.path.join(out_dir, "info.json"), "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
