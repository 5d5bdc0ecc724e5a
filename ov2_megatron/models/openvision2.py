"""OpenVision 2: ViT -> keep a random subset of patch tokens -> caption decoder -> loss.

One `OpenVision2` module is one pipeline chunk (the whole model when PP=1); its StagePlan
says which pieces it holds:

    images [b,c,H,W] -> VisionEmbedding -> ViT layers -> | boundary: token drop, projection,
    caption embedding | -> decoder layers -> final norm -> head -> caption loss

As in the official code, the decoder reads the raw output of the last ViT block; the ViT's
final LayerNorm (`pooled_norm`, official `encoder_norm`) acts only on the pooled feature,
LN(mean of the patch tokens), which the caption loss never reaches: it gets no gradient there
either, so it is a frozen parameter (kept for exports and imported checkpoints).

Stages before the boundary send [s_vit(/tp), b, w_vit], stages after it [s_dec(/tp), b, d].
Every chunk is called as `model(images, tokens, keep_idx)`; a chunk that is not first reads
its input from megatron's `set_input_tensor`. The last chunk returns the loss sums
(CaptionHead), the others the hidden states to send.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule

from ov2_megatron.config import ModelConfig, ParallelConfig, SequenceGeometry
from ov2_megatron.models import specs
from ov2_megatron.models.caption_decoder import CaptionHead, CaptionInput
from ov2_megatron.models.stage_block import StageBlock
from ov2_megatron.models.vision_encoder import VisionEmbedding, key_padding_mask
from ov2_megatron.parallel.pipeline_split import StagePlan


class OpenVision2(MegatronModule):
    def __init__(self, model: ModelConfig, parallel: ParallelConfig, geom: SequenceGeometry,
                 plan: StagePlan, impl: str = "local",
                 params_dtype: torch.dtype = torch.float32, recompute: str = "none",
                 fused_kernels: bool | None = None):
        vit, patch = model.vision.shape()
        dec = model.decoder.shape()
        super().__init__(config=specs.schedule_config(dec, model, parallel, params_dtype))
        self.model_type = ModelType.encoder_or_decoder
        # Read by megatron's finalize_model_grads (written for GPT's tied embeddings): our
        # caption embedding and head are separate weights, so nothing is shared across stages.
        self.pre_process, self.post_process = plan.has_embedding, plan.has_head
        self.share_embeddings_and_output_weights = False
        self.plan, self.geom, self.impl = plan, geom, impl
        self.vocab_size, self.pad_id = model.decoder.vocab_size, model.decoder.pad_id
        self.loss_weight = model.decoder.loss_weight
        self.prefix_mask = model.decoder.mask == "prefix"
        self.input_tensor = None

        def vit_stack():
            return specs.stack_config(vit, plan.num_vit_layers, model, parallel, params_dtype,
                                      recompute, model.vision.gelu_approximate, fused_kernels)

        def decoder_stack():
            return specs.stack_config(dec, plan.num_decoder_layers, model, parallel,
                                      params_dtype, recompute, model.decoder.gelu_approximate,
                                      fused_kernels)

        self.embedding = self.vision_layers = self.pooled_norm = self.caption_input = None
        self.decoder_layers = self.head = None
        if plan.has_embedding:
            self.embedding = VisionEmbedding(vit_stack(), model.vision, geom, patch)
        if plan.num_vit_layers:
            # 'padding' only when alignment added positions: otherwise no mask at all, which
            # lets TE pick its fastest (unmasked) attention kernel.
            mask = AttnMaskType.padding if geom.vit_seq > geom.vit_tokens else AttnMaskType.no_mask
            self.vision_layers = StageBlock(vit_stack(), specs.layer_spec(impl, mask),
                                            plan.vit_layers, vit.depth, final_norm=False)
        if plan.has_boundary:
            self.pooled_norm = torch.nn.LayerNorm(vit.width, eps=model.layernorm_eps,
                                                  dtype=params_dtype)
            self.pooled_norm.requires_grad_(False)
            self.caption_input = CaptionInput(decoder_stack(), vit.width, model.decoder, geom)
        if plan.num_decoder_layers:
            mask = AttnMaskType.arbitrary if self.prefix_mask else AttnMaskType.causal
            self.decoder_layers = StageBlock(
                decoder_stack(), specs.layer_spec(impl, mask),
                plan.decoder_layers, dec.depth, final_norm=plan.has_head)
        if plan.has_head:
            self.head = CaptionHead(decoder_stack(), model.decoder, geom)

    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedules hand a non-first chunk its input here."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None,
                keep_idx: torch.Tensor | None):
        """Returns the hidden states to send, or on the last chunk the loss sums:
        {'loss_sum', 'num_tokens', 'correct'} over caption tokens (PAD excluded)."""
        if tokens is not None and not tokens.is_cuda:  # free on CPU; on GPUs the tokenizer is
            check_token_ids(tokens, self.vocab_size)  # checked against the vocabulary at set-up
        x = self.embedding(images) if self.embedding is not None else self.input_tensor
        num_image = keep_idx.shape[1]
        if self.vision_layers is not None:
            mask = self._vit_mask(self.geom.vit_tokens, self.geom.vit_seq, x)
            x = self.vision_layers(x, attention_mask=mask)  # [s_vit(/tp), b, w]
        if self.caption_input is not None:
            x = self.caption_input(x, tokens, keep_idx)  # [s_dec(/tp), b, d]
        if self.decoder_layers is not None:
            x = self.decoder_layers(x, attention_mask=self._decoder_mask(x, num_image))
        if self.head is not None:
            return self.head(x, tokens, num_image)
        return x

    def _vit_mask(self, real: int, seq: int, x: torch.Tensor) -> torch.Tensor | None:
        return key_padding_mask(real, seq, x.shape[1], self.impl, x.device)

    def _decoder_mask(self, x: torch.Tensor, num_image: int) -> torch.Tensor | None:
        """None for causal (megatron builds it); for 'prefix', image tokens see each other.
        Trailing alignment padding needs nothing: it comes after every real position."""
        if not self.prefix_mask:
            return None
        k = num_image
        s = self.geom.padded(k + self.geom.text_len)
        masked = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)  # True = hidden
        masked[:k, :k] = False
        return masked.view(1, 1, s, s)

    def caption_logits(self, images: torch.Tensor, tokens: torch.Tensor,
                       keep_idx: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits at the text positions [b, t, v] (single-chunk models)."""
        if self.embedding is None or self.head is None:
            raise ValueError("caption_logits() needs the whole model in one chunk "
                             "(parallel.pipeline = 1)")
        from megatron.core import tensor_parallel

        x = self.embedding(images)
        x = self.vision_layers(x, attention_mask=self._vit_mask(self.geom.vit_tokens,
                                                                self.geom.vit_seq, x))
        x = self.caption_input(x, tokens, keep_idx)
        x = self.decoder_layers(x, attention_mask=self._decoder_mask(x, keep_idx.shape[1]))
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            self.head.logits(x, keep_idx.shape[1]))
        return logits[..., : self.vocab_size].transpose(0, 1)  # drop vocabulary padding

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Downstream features of a whole-encoder chunk, at any resolution (multiple of the
        patch), as the official ViT returns them: patch tokens [b, n, w], the raw output of
        the last block (what the caption decoder was trained on), and the pooled feature [b, w]
        = LN(mean of the patch tokens) (official pool_type 'gap' + encoder_norm)."""
        if self.embedding is None or not self.plan.has_boundary:
            raise ValueError("encode() needs the whole encoder in one chunk: load the "
                             "checkpoint with parallel.pipeline = 1")
        from megatron.core import tensor_parallel

        x = self.embedding(images, any_resolution=True)  # [s(/tp), b, w]
        real = self.embedding.real_tokens(images)
        x = self.vision_layers(x, attention_mask=self._vit_mask(real, self.geom.padded(real), x))
        if self.config.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False)
        patches = x[self.geom.vit_prefix:real].transpose(0, 1)  # [b, n, w]
        if not torch.is_grad_enabled():  # megatron's blocks return viewless tensors that
            patches = patches.detach()  # require grad even under no_grad
        return patches, self.pooled_norm(patches.mean(dim=1))


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"caption token ids span [{low}, {high}], outside the vocabulary "
                         f"[0, {vocab_size}) (decoder.vocab_size): the tokenizer and the "
                         "model config disagree")


def build_chunks(model: ModelConfig, parallel: ParallelConfig, geom: SequenceGeometry,
                 impl: str = "local", params_dtype: torch.dtype = torch.float32,
                 init_seed: int | None = None, recompute: str = "none",
                 fused_kernels: bool | None = None) -> list[OpenVision2]:
    """This rank's model chunks (one per virtual stage), from megatron's parallel state.

    With `init_seed`, weights are drawn independently of the layout (models/init.py).
    `fused_kernels` as in specs.stack_config (default: where CUDA is)."""
    from megatron.core import parallel_state

    from ov2_megatron.parallel import pipeline_split

    vit, _ = model.vision.shape()
    dec = model.decoder.shape()
    head_flops = 2 * geom.text_len * dec.width * geom.padded_vocab
    chunks = parallel.pipeline * (parallel.virtual_pipeline or 1)
    plans = pipeline_split.plan_stages(vit, geom.vit_seq, dec, geom.decoder_seq, head_flops,
                                       chunks)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = [OpenVision2(model, parallel, geom,
                          plans[pipeline_split.chunk_index(rank, vp, parallel.pipeline)],
                          impl, params_dtype, recompute, fused_kernels)
              for vp in range(parallel.virtual_pipeline or 1)]
    if init_seed is not None:
        from ov2_megatron.models.init import initialize_weights

        for chunk in chunks:
            initialize_weights(chunk, init_seed, model)
    for chunk in chunks:
        # torch LayerNorms ignore params_dtype; megatron's Float16Module casts the same way.
        chunk.to(dtype=params_dtype)
    return chunks
