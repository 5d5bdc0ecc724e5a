"""Runs INSIDE .venv-convert (torch 2.14 + torchvision + timm + transformers + open_clip, see
`make convert-env`), never in the main venv: it loads exported models with the real
third-party packages, or builds an OpenCLIP model and saves it in the released format.

    python third_party_features.py --job LIBRARY MODEL_DIR PIXELS.npy OUT_DIR [--job ...]

LIBRARY is timm or hf (load the exported MODEL_DIR), or openclip-make (MODEL_DIR holds
open_clip_config.json; the model is built, randomised and saved there as
open_clip_pytorch_model.bin). Several jobs share one process (one torch import).
Each job writes OUT_DIR/patch_tokens.npy [N, patches, w], OUT_DIR/pooled.npy [N, w] and
OUT_DIR/info.json. Self-contained: nothing of ov2_megatron is imported here.
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
    info = dict(library=f"timm {timm.__version__}", model_class=type(model).__name__,
                num_prefix_tokens=model.num_prefix_tokens)
    return features[:, model.num_prefix_tokens:], pooled, info


def hf_features(model_dir: str, pixels: torch.Tensor):
    import transformers
    from transformers import AutoImageProcessor, AutoModel

    model, loading = AutoModel.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: v for k, v in loading.items() if v}
    if problems:
        raise SystemExit(f"transformers did not load every tensor exactly: {problems}")
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    info = dict(library=f"transformers {transformers.__version__}",
                model_class=type(model).__name__, num_prefix_tokens=prefix,
                image_mean=list(processor.image_mean), image_std=list(processor.image_std))
    return out.last_hidden_state[:, prefix:], out.pooler_output, info


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
    info = dict(library=f"open_clip {open_clip.__version__}", model_class=type(visual).__name__,
                tensors=sorted(state), ln_pre=type(visual.ln_pre).__name__)
    return tokens, pooled, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", nargs=4, action="append", required=True,
                        metavar=("LIBRARY", "MODEL_DIR", "PIXELS", "OUT_DIR"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big-vision-sincos", action="store_true",
                        help="openclip-make: big_vision's sin-cos table in the patch rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for library, model_dir, pixels_path, out_dir in args.job:
        pixels = torch.from_numpy(np.load(pixels_path))
        if library == "timm":
            tokens, pooled, info = timm_features(model_dir, pixels)
        elif library == "hf":
            tokens, pooled, info = hf_features(model_dir, pixels)
        elif library == "openclip-make":
            tokens, pooled, info = openclip_make(model_dir, pixels, args.seed,
                                                 args.big_vision_sincos)
        else:
            raise SystemExit(f"unknown library {library!r}: use timm, hf or openclip-make")
        os.makedirs(out_dir, exist_ok=True)
        np.save(os.path.join(out_dir, "patch_tokens.npy"), tokens.float().numpy())
        np.save(os.path.join(out_dir, "pooled.npy"), pooled.float().numpy())
        info["torch"] = torch.__version__
        with open(os.path.join(out_dir, "info.json"), "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
