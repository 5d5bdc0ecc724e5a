"""OpenVision 1's objective on the same encoder: the baseline of OpenVision 2's efficiency claim.

OpenVision (v1, CLIPS-style) trains the ViT with two losses: a CLIP contrastive loss between
the pooled image feature and a text encoder's caption feature, plus the captioning loss of a
decoder that reads *all* patch tokens. OpenVision 2 drops the text encoder and the
contrastive loss and shows the decoder a random ~35% of the tokens. To measure what that
buys (perf/side_by_side.py), this module builds the v1 objective from the very parts of
models/openvision2.py (embedding, ViT block, caption input, decoder block, caption head; all
megatron layers) plus a causal text encoder, shaped like the caption decoder as in the
OpenVision recipes:

    images -> ViT -> LN(mean of patches) -> linear -> e_img --\
    captions -> embed + positions -> text layers ->   > CLIP loss (in-batch, learned scale)
                EOS token -> linear -> e_txt --------/
    ViT tokens (all N) -> caption decoder -> caption loss (x loss_weight, as in OpenVision 2)

A baseline, kept small on purpose: one pipeline stage, TP = 1, the contrastive loss over the
local batch (no all-gather across data-parallel ranks), trained by the caller's optimizer.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ov2_megatron.config import ModelConfig, ParallelConfig, validate_model
from ov2_megatron.models import specs
from ov2_megatron.models.openvision2 import OpenVision2
from ov2_megatron.models.stage_block import StageBlock
from ov2_megatron.parallel.pipeline_split import StagePlan
from ov2_megatron.variants import TransformerShape


class TextEncoder(MegatronModule):
    """Caption tokens [b, L] -> the final-norm state at each caption's last real token [b, d]."""

    def __init__(self, shape: TransformerShape, model: ModelConfig, geom,
                 params_dtype: torch.dtype):
        config = specs.stack_config(shape, shape.depth, model, ParallelConfig(), params_dtype)
        super().__init__(config=config)
        self.pad_id = model.decoder.pad_id
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            geom.padded_vocab, shape.width, init_method=config.init_method, config=config)
        self.positions = torch.nn.Parameter(
            torch.zeros(model.decoder.caption_length, shape.width, dtype=params_dtype))
        config.init_method(self.positions.data)
        self.layers = StageBlock(config, specs.layer_spec("local", AttnMaskType.causal),
                                 (0, shape.depth), shape.depth, final_norm=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens).transpose(0, 1) + self.positions.unsqueeze(1)  # [L, b, d]
        x = self.layers(x.contiguous(), attention_mask=None)  # causal: [L, b, d]
        last = (tokens != self.pad_id).sum(dim=1).clamp(min=1) - 1  # [b] EOS position
        return x[last, torch.arange(tokens.shape[0], device=tokens.device)]  # [b, d]


class OpenVision1(MegatronModule):
    """`model(images, tokens)` -> {'loss', 'caption_loss', 'contrastive_loss', 'num_tokens'}."""

    def __init__(self, model: ModelConfig, text: TransformerShape | None = None,
                 embed_dim: int | None = None, params_dtype: torch.dtype = torch.float32):
        all_tokens = copy.deepcopy(model)
        all_tokens.vision.keep_ratio = 1.0  # v1's decoder reads every patch token
        geom = validate_model(all_tokens, ParallelConfig())
        vit, _ = all_tokens.vision.shape()
        dec = all_tokens.decoder.shape()
        text = text or dec
        captioner = OpenVision2(all_tokens, ParallelConfig(), geom,
                                StagePlan((0, vit.depth), (0, dec.depth), True, True, True),
                                "local", params_dtype)
        super().__init__(config=captioner.config)
        captioner.pooled_norm.requires_grad_(True)  # v1's contrastive loss trains the pooled feature
        self.geom, self.loss_weight = geom, all_tokens.decoder.loss_weight
        self.captioner = captioner
        self.text_encoder = TextEncoder(text, all_tokens, geom, params_dtype)
        embed_dim = embed_dim or dec.width
        self.image_projection = torch.nn.Linear(vit.width, embed_dim, bias=False,
                                                dtype=params_dtype)
        self.text_projection = torch.nn.Linear(text.width, embed_dim, bias=False,
                                               dtype=params_dtype)
        # CLIP's learned temperature, initialised to 1 / 0.07.
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.captioner
        encoded = c.vision_layers(c.embedding(images), attention_mask=None)  # [s, b, w]
        n = self.geom.num_patches
        keep_all = torch.arange(n, device=tokens.device).expand(tokens.shape[0], -1)  # [b, N]
        x = c.caption_input(encoded, tokens, keep_all)  # [N + T, b, d]
        sums = c.head(c.decoder_layers(x, attention_mask=c._decoder_mask(x, n)), tokens, n)
        caption = sums["loss_sum"] / sums["num_tokens"].clamp(min=1)
        patches = encoded[self.geom.vit_prefix:self.geom.vit_tokens]  # [N, b, w]
        pooled = c.pooled_norm(patches.mean(dim=0))  # [b, w], the official pooled feature
        image = F.normalize(self.image_projection(pooled), dim=-1)  # [b, e]
        text = F.normalize(self.text_projection(self.text_encoder(tokens)), dim=-1)  # [b, e]
        logits = self.logit_scale.exp() * image @ text.t()  # [b, b], matches on the diagonal
        target = torch.arange(logits.shape[0], device=logits.device)
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        return dict(loss=self.loss_weight * caption + contrastive, caption_loss=caption,
                    contrastive_loss=contrastive, num_tokens=sums["num_tokens"])
