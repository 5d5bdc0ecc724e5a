"""OpenVision 1's objective on the same encoder: the baseline of OpenVision 2's efficiency claim.

OpenVision (v1, CLIPS-style; official `src/configs/openvision.py`, `models/two_towers.py`,
`text_transformer.py`, `text_decoder.py`, `losses/common.py`, `main_clip.py`) trains the ViT with
two losses, built here from megatron layers and the ViT / decoder / head of models/openvision2.py:

    images -> ViT (every patch token) -> LN(mean of patches) -> linear -> z_img
    alt-text, recap sub-caption [b, 2, L] -> text encoder -> LN(CLS) -> linear -> z_txt1, z_txt2
    CLIP loss on (z_img, z_txt1) and (z_img, z_txt2), weight 1
    [all N patch tokens; the alt-text's L-1 encoder tokens; T learned queries] -> decoder
        (prefix mask: the first N + L - 1 positions see each other, the queries are causal)
        -> head at the T query positions -> cross-entropy on the whole caption (x loss_weight)

What makes it cost more than OpenVision 2 (perf/side_by_side.py measures each part):
- a text encoder as large as the decoder (L/14: 768 x 12, the image variant's letter), run
  bidirectionally over 2 captions per image of L = 80 tokens (the last one a CLS id);
- the contrastive loss: per rank, [b, B] logits against the all-gathered features of the
  global batch B, four of them (image -> each text, each text -> image);
- a decoder sequence of N + (L - 1) + T tokens (L/14 @ 224: 256 + 79 + 127 = 462) instead of
  OpenVision 2's 35% of N + T (89 + 127 = 216): no token drop, and the text prefix.
The official decoder has 128 queries predicting the caption's 128 shifted labels, of which
the last is always padding; here the T = caption_length - 1 queries that carry a label.

One pipeline stage, TP = 1; the contrastive loss gathers over `group` (data parallel) when
one is given, as the official `local_loss` does; trained by the caller's optimizer.
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

TEXT_LENGTH = 80
"""Text-encoder tokens per caption (official token_len), the last one the CLS id."""


class TextEncoder(MegatronModule):
    """Captions [n, L] (each ending in the CLS id) -> (LN(state at CLS) [n, d], the pre-norm
    states of the other L - 1 positions [L - 1, n, d]), bidirectional as the official tower."""

    def __init__(self, shape: TransformerShape, model: ModelConfig, geom, length: int,
                 params_dtype: torch.dtype):
        config = specs.stack_config(shape, shape.depth, model, ParallelConfig(), params_dtype)
        super().__init__(config=config)
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            geom.padded_vocab, shape.width, init_method=config.init_method, config=config)
        self.positions = torch.nn.Parameter(torch.zeros(length, shape.width, dtype=params_dtype))
        config.init_method(self.positions.data)
        self.layers = StageBlock(config, specs.layer_spec("local", AttnMaskType.no_mask),
                                 (0, shape.depth), shape.depth, final_norm=False)
        self.norm = torch.nn.LayerNorm(shape.width, eps=model.layernorm_eps, dtype=params_dtype)

    def forward(self, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding(texts).transpose(0, 1) + self.positions.unsqueeze(1)  # [L, n, d]
        x = self.layers(x.contiguous(), attention_mask=None)  # [L, n, d]
        return self.norm(x[-1]), x[:-1]  # [n, d], [L - 1, n, d]


class PrefixQueries(MegatronModule):
    """(patch tokens [N, b, w], alt-text tokens [L - 1, b, d_txt]) -> the decoder input
    [N + L - 1 + T (+ alignment padding), b, d]: both projected (bias-free), then T learned
    queries (official `learnable_tokens`, N(0, 1) init)."""

    def __init__(self, config, vit_width: int, text_width: int, queries: int):
        super().__init__(config=config)
        d, dtype = config.hidden_size, config.params_dtype
        self.image_projection = torch.nn.Linear(vit_width, d, bias=False, dtype=dtype)
        self.text_projection = None  # text_width 0: no text prefix
        torch.nn.init.normal_(self.image_projection.weight, std=vit_width ** -0.5)
        if text_width:
            self.text_projection = torch.nn.Linear(text_width, d, bias=False, dtype=dtype)
            torch.nn.init.normal_(self.text_projection.weight, std=text_width ** -0.5)
        self.queries = torch.nn.Parameter(torch.randn(queries, d, dtype=dtype))

    def forward(self, patches: torch.Tensor, text: torch.Tensor | None,
                padding: int) -> torch.Tensor:
        b = patches.shape[1]
        parts = [self.image_projection(patches)]  # [N, b, d]
        if text is not None:
            parts.append(self.text_projection(text))  # [L - 1, b, d]
        x = torch.cat([*parts, self.queries.unsqueeze(1).expand(-1, b, -1)])  # [N + L-1 + T, b, d]
        if padding:
            x = torch.cat([x, x.new_zeros(padding, *x.shape[1:])])
        return x.contiguous()


def prefix_mask(prefix: int, seq: int, device) -> torch.Tensor:
    """[1, 1, s, s], True = hidden: the first `prefix` positions see each other, the rest are
    causal (they see the prefix and earlier queries); trailing padding sees and is seen by
    nothing real, as it comes last."""
    masked = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)
    masked[:prefix, :prefix] = False
    return masked.view(1, 1, seq, seq)


def text_inputs(tokens: torch.Tensor, length: int, cls_id: int, pad_id: int = 0) -> torch.Tensor:
    """The text encoder's two captions [b, 2, L] cut from the caption tokens [b, *] when no
    alt-text is at hand: its first L - 1 tokens (padded with pad_id) + CLS, twice."""
    body = tokens[:, :length - 1]
    body = F.pad(body, (0, length - 1 - body.shape[1]), value=pad_id)  # [b, L - 1]
    text = torch.cat([body, body.new_full((body.shape[0], 1), cls_id)], dim=1)  # [b, L]
    return torch.stack([text, text], dim=1)


def contrastive_loss(image: torch.Tensor, texts: tuple[torch.Tensor, ...], scale: torch.Tensor,
                     group=None) -> torch.Tensor:
    """The official `local_loss`: every rank scores its b images against all B gathered texts
    and its b texts (of each kind) against all B gathered images, [b, B] logits each; mean of
    (img->txt + txt->img) / 2 over the text kinds. The features are gathered with gradient."""
    offset, gather = 0, (lambda x: x)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        from torch.distributed.nn.functional import all_gather

        offset = torch.distributed.get_rank(group) * image.shape[0]
        gather = lambda x: torch.cat(all_gather(x.contiguous(), group=group))  # noqa: E731
    target = offset + torch.arange(image.shape[0], device=image.device)
    all_images = gather(image)  # [B, e]
    losses = []
    for text in texts:
        to_text = scale * image @ gather(text).t()  # [b, B]
        to_image = scale * text @ all_images.t()  # [b, B]
        losses.append((F.cross_entropy(to_text, target) + F.cross_entropy(to_image, target)) / 2)
    return torch.stack(losses).mean()


class OpenVision1(MegatronModule):
    """`model(images, tokens, texts=None)` -> {'loss', 'caption_loss', 'contrastive_loss',
    'num_tokens'}; `texts` [b, 2, L] (alt-text, recap sub-caption), else cut from `tokens`.

    `contrastive` / `text_prefix` / `keep_ratio` switch parts off for perf/side_by_side.py's
    breakdown (the official OpenVision 1 is contrastive=True, text_prefix=True, keep 1.0)."""

    def __init__(self, model: ModelConfig, text: TransformerShape | None = None,
                 text_length: int = TEXT_LENGTH, embed_dim: int | None = None,
                 params_dtype: torch.dtype = torch.float32, group=None, cls_id: int = 1,
                 contrastive: bool = True, text_prefix: bool = True, keep_ratio: float = 1.0):
        decoder_model = copy.deepcopy(model)
        decoder_model.vision.keep_ratio = keep_ratio
        decoder_model.decoder.mask = "prefix"  # an arbitrary-mask spec; prefix_mask() fills it
        geom = validate_model(decoder_model, ParallelConfig())
        vit, _ = model.vision.shape()
        dec = model.decoder.shape()
        text = text or dec
        # ViT, decoder layers and head of OpenVision 2; its boundary (token drop, caption
        # embedding) is replaced by PrefixQueries: the v1 decoder reads no caption tokens.
        captioner = OpenVision2(decoder_model, ParallelConfig(), geom,
                                StagePlan((0, vit.depth), (0, dec.depth), True, False, True),
                                "local", params_dtype)
        super().__init__(config=captioner.config)
        self.geom, self.loss_weight, self.group = geom, model.decoder.loss_weight, group
        self.text_length, self.cls_id, self.pad_id = text_length, cls_id, model.decoder.pad_id
        self.use_contrastive, self.text_prefix = contrastive, text_prefix
        self.captioner = captioner
        self.decoder_input = PrefixQueries(captioner.decoder_layers.config, vit.width,
                                           text.width if text_prefix else 0, geom.text_len)
        # Parts a switched-off variant does not use are not built: no weights to hold.
        self.text_encoder = self.pooled_norm = self.image_head = self.text_head = None
        if contrastive or text_prefix:
            self.text_encoder = TextEncoder(text, model, geom, text_length, params_dtype)
        if contrastive:
            self.pooled_norm = torch.nn.LayerNorm(vit.width, eps=model.layernorm_eps,
                                                  dtype=params_dtype)
            embed_dim = embed_dim or text.width  # official out_dim: 768 for L
            self.image_head = torch.nn.Linear(vit.width, embed_dim, bias=False,
                                              dtype=params_dtype)
            self.text_head = torch.nn.Linear(text.width, embed_dim, bias=False,
                                             dtype=params_dtype)
            # CLIP's learned temperature, initialised to 1 / 0.07.
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                texts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        c, geom = self.captioner, self.geom
        if texts is None:
            texts = text_inputs(tokens, self.text_length, self.cls_id, self.pad_id)
        b = images.shape[0]
        encoded = c.vision_layers(c.embedding(images), attention_mask=None)  # [s, b, w]
        patches = encoded[geom.vit_prefix:geom.vit_tokens]  # [N, b, w]
        needs_text = self.use_contrastive or self.text_prefix
        kinds = 2 if self.use_contrastive else 1  # the prefix needs the alt-text only
        if needs_text:
            flat = texts[:, :kinds].transpose(0, 1).reshape(kinds * b, -1)  # [kinds*b, L]
            pooled_text, text_tokens = self.text_encoder(flat)  # [kinds*b, d], [L-1, kinds*b, d]
        kept = patches
        if geom.num_kept < geom.num_patches:  # the breakdown's "OV1 with token drop"
            order = torch.rand(b, geom.num_patches, device=images.device).argsort(dim=1)
            idx = order[:, :geom.num_kept].t()  # [k, b]
            kept = patches.gather(0, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        prefix_text = text_tokens[:, :b] if self.text_prefix else None  # the alt-text's
        prefix = kept.shape[0] + (0 if prefix_text is None else prefix_text.shape[0])
        real = prefix + geom.text_len
        seq = geom.padded(real)
        x = self.decoder_input(kept, prefix_text, seq - real)  # [s_dec, b, d]
        x = c.decoder_layers(x, attention_mask=prefix_mask(prefix, seq, x.device))
        sums = c.head(x, tokens, prefix)  # the T query positions
        caption = sums["loss_sum"] / sums["num_tokens"].clamp(min=1)
        loss = self.loss_weight * caption
        contrastive = caption.new_zeros(())
        if self.use_contrastive:
            image = F.normalize(self.image_head(self.pooled_norm(patches.mean(dim=0))), dim=-1)
            text = F.normalize(self.text_head(pooled_text), dim=-1)  # [2b, e]
            contrastive = contrastive_loss(image, (text[:b], text[b:]), self.logit_scale.exp(),
                                           self.group)
            loss = loss + contrastive
        return dict(loss=loss, caption_loss=caption, contrastive_loss=contrastive,
                    num_tokens=sums["num_tokens"])
