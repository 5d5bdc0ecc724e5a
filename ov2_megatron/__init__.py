"""ov2_megatron: OpenVision 2 (captioning-only vision-encoder pretraining) on megatron-core."""

__version__ = "0.1.0"
