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


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message names the file or tensor and why."""
