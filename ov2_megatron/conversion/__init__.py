"""Checkpoint conversion: this framework's encoder <-> the formats people load vision towers from.

    megatron_checkpoint  distributed checkpoint <-> one "standard" state dict (consolidate),
                         with the name / shape checks every conversion shares
    vision_tower         the encoder part of a standard state dict, as the exporters see it
    timm_format          -> timm VisionTransformer (config.json + model.safetensors)
    hf_format            -> Hugging Face TimmWrapperModel (exact), or ViTModel /
                            Dinov2WithRegistersModel (--hf-class vit)
    openclip_format      OpenCLIP ViT (open_clip_config.json + open_clip_pytorch_model.bin) ->
    feature_extraction   images / shards / pixel arrays -> encode() features
    caption_decoder_export  the caption decoder on its own (decoder_config.json +
                         decoder.safetensors) as a plain PyTorch module
    caption_search       greedy and beam-search captions from that module
    atomic_output        outputs appear whole or not at all (and honour the umask)

Images are preprocessed by the one evaluation transform, ov2_megatron/data/preprocess.py;
each export's image-processor config (timm pretrained_cfg, HF preprocessor_config.json,
OpenCLIP preprocess_cfg) is derived from it, so the libraries' own pipelines give its pixels.

Every export reproduces encode()'s official features: the patch tokens, the raw output of the
last block (no LayerNorm on them), and the pooled feature, LN(mean of the patch tokens) (the
native HF classes hold them in hidden_states[-1], not in their outputs: hf_format.py).
None of timm, transformers or open_clip is imported: the files are written in their formats
and the tests load them with the real packages (tests/conversion/).
"""

from __future__ import annotations

import argparse
import os


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message names the file or tensor and why."""


def checkpoint_tool_parser(doc: str, checkpoint_help: str,
                           batch_size: int) -> argparse.ArgumentParser:
    """The options of the tools that run a checkpoint's model (caption.py, extract_features.py):
    --checkpoint, --config, --device, --batch-size and --resize, with the tool's docstring `doc`
    as description and epilog. Imports no torch: the parser runs before `pin_device`."""
    from ov2_megatron.data.preprocess import RESIZE_MODES

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     epilog=doc.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--config", help="run config.json (default: the run dir's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--resize", choices=RESIZE_MODES, default="squash",
                        help="evaluation resize (ov2_megatron/data/preprocess.py): squash "
                             "(default: bilinear to the square size, what the released "
                             "OpenVision checkpoints declare) or shortest (shorter side, then "
                             "the centre crop: the official big_vision evaluation)")
    return parser


def pin_device(device: str | None) -> None:
    """Hide the GPUs for --device cpu. Call before torch starts: megatron's set-up would pick
    NCCL on a GPU box."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
