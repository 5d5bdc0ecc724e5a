"""Caption decoder ends: the boundary that turns encoder tokens into the decoder sequence,
and the vocabulary head with the caption loss. The layers between are megatron
TransformerBlocks (stage_block.py) with a causal or prefix mask.

The decoder sequence is [k kept image tokens; t caption tokens; alignment padding]. The
decoder receives the *raw* output of the last ViT block (no LayerNorm on that path: the
official model normalises only the pooled feature). Padding comes last, so under the causal
(or prefix) mask no real position ever attends to it; the head reads positions [k, k + t)
only. k is read from the kept indices of each call, so evaluation may keep every patch.

Tensor-parallel reasoning (why each collective is where it is):
- The boundary runs replicated on every TP rank: under SP it first all-gathers the encoder
  sequence (its backward only splits, because the replicated computation after it gives every
  rank the same full gradient), then re-scatters the decoder sequence.
- The caption embedding is vocab-parallel (all-reduce of the rank's vocabulary slice).
- The head is vocab-parallel; it only sees text positions, so under SP we all-gather the
  hidden states, slice off the image positions and run the head with SP off (its backward
  all-reduces the input gradient, so the gather's backward again only splits).
- The chunked loss (decoder.loss_kernel, the default) takes the head's weight shard and does
  the same: three all-reduces of [t*b] partial softmax sums in forward, the input gradient's
  all-reduce in backward, and never more than one [chunk, v/tp] block of logits.
"""

from __future__ import annotations

import copy

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from kernels.linear_cross_entropy import vocab_parallel_linear_cross_entropy
from ov2_megatron.config import DecoderConfig, SequenceGeometry
from ov2_megatron.models.token_drop import gather_kept


class CaptionInput(MegatronModule):
    """encoder tokens [s_vit(/tp), b, w] + captions [b, L] -> decoder input [s_dec(/tp), b, d]."""

    def __init__(self, config: TransformerConfig, encoder_width: int, decoder: DecoderConfig,
                 geom: SequenceGeometry):
        super().__init__(config=config)
        self.geom, self.vocab_size = geom, decoder.vocab_size
        self.projection = torch.nn.Linear(encoder_width, config.hidden_size, bias=False,
                                          dtype=config.params_dtype)
        config.init_method(self.projection.weight.data)
        self.token_embedding = tensor_parallel.VocabParallelEmbedding(
            geom.padded_vocab, config.hidden_size, init_method=config.init_method, config=config)
        self.pos_embed = None
        if decoder.pos_embed == "learned":
            self.pos_embed = torch.nn.Parameter(  # real positions only: padding gets none
                torch.zeros(geom.decoder_tokens, config.hidden_size, dtype=config.params_dtype))
            config.init_method(self.pos_embed.data)

    def forward(self, encoded: torch.Tensor, tokens: torch.Tensor,
                keep_idx: torch.Tensor) -> torch.Tensor:
        if self.config.sequence_parallel:
            encoded = mappings.gather_from_sequence_parallel_region(
                encoded, tensor_parallel_output_grad=False)  # [s_vit, b, w]
        kept = gather_kept(encoded, self.geom.vit_prefix, keep_idx)  # [k, b, w]
        image = self.projection(kept)  # [k, b, d]
        text = self.token_embedding(tokens[:, :-1]).transpose(0, 1)  # [t, b, d]
        x = torch.cat([image, text.to(image.dtype)])  # [k + t, b, d]
        if self.pos_embed is not None:
            if x.shape[0] != self.pos_embed.shape[0]:
                raise ValueError(f"{kept.shape[0]} kept tokens: learned decoder positions "
                                 f"cover {self.geom.num_kept}; keep that many")
            x = x + self.pos_embed.unsqueeze(1)
        padding = self.geom.padding(x.shape[0])
        if padding:
            x = torch.cat([x, x.new_zeros(padding, *x.shape[1:])])  # [s_dec, b, d]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)  # [(k + t)/tp, b, d]
        return x.contiguous()


class CaptionHead(MegatronModule):
    """decoder output [s_dec(/tp), b, d] -> per-token caption loss [t, b] and metrics."""

    def __init__(self, config: TransformerConfig, decoder: DecoderConfig, geom: SequenceGeometry):
        super().__init__(config=config)
        self.geom, self.pad_id, self.vocab_size = geom, decoder.pad_id, decoder.vocab_size
        self.loss_kernel = decoder.loss_kernel
        head_config = copy.copy(config)
        head_config.sequence_parallel = False  # we gather and slice before the head
        self.head = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, geom.padded_vocab, config=head_config,
            init_method=config.init_method, bias=False, gather_output=False)

    def logits(self, hidden: torch.Tensor, num_image: int) -> torch.Tensor:
        """[s_dec(/tp), b, d] -> vocab-parallel logits at text positions [t, b, v/tp]."""
        logits, _ = self.head(self._text_hidden(hidden, num_image))
        return self._mask_vocab_padding(logits)

    def _text_hidden(self, hidden: torch.Tensor, num_image: int) -> torch.Tensor:
        """[s_dec(/tp), b, d] -> the text positions [t, b, d], whole on every TP rank."""
        if self.config.sequence_parallel:
            hidden = mappings.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)  # [s_dec, b, d]
        return hidden[num_image:num_image + self.geom.text_len]

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Padding rows of the vocabulary (added for even TP shards) can never be predicted:
        -inf keeps them out of the softmax normaliser, so the loss is that of the real vocab."""
        local = logits.shape[-1]
        start = _shard_start(local)
        if start + local <= self.vocab_size:
            return logits
        ids = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(ids >= self.vocab_size, float("-inf"))

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor,
                num_image: int) -> dict[str, torch.Tensor]:
        labels = tokens[:, 1:].t().contiguous()  # [t, b]
        if self.loss_kernel == "chunked":
            return self._chunked_loss(hidden, labels, num_image)
        logits = self.logits(hidden, num_image).float()  # [t, b, v/tp]
        token_loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)  # [t, b]
        mask = labels != self.pad_id
        with torch.no_grad():
            correct = (vocab_parallel_argmax(logits) == labels) & mask
        return dict(loss_sum=(token_loss * mask).sum(), num_tokens=mask.sum(),
                    correct=correct.sum())

    def _chunked_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                      num_image: int) -> dict[str, torch.Tensor]:
        """The plain head's loss and metrics from the weight shard's real vocabulary rows
        (the padding rows the plain head masks to -inf are left out), chunk by chunk."""
        from megatron.core import parallel_state

        text = self._text_hidden(hidden, num_image)  # [t, b, d]
        weight = self.head.weight  # [v/tp, d], rows [start, start + v/tp) of the vocabulary
        start = _shard_start(weight.shape[0])
        real = max(0, min(weight.shape[0], self.vocab_size - start))
        group = parallel_state.get_tensor_model_parallel_group() \
            if parallel_state.get_tensor_model_parallel_world_size() > 1 else None
        loss, num_tokens, hits = vocab_parallel_linear_cross_entropy(
            text.reshape(-1, text.shape[-1]), weight[:real], labels.reshape(-1), group,
            ignore_index=self.pad_id, vocab_start=start, return_hits=True)  # [t*b] each
        return dict(loss_sum=loss.sum(), num_tokens=num_tokens, correct=hits.sum())


def _shard_start(rows: int) -> int:
    """First vocabulary id of this TP rank's head shard of `rows` rows."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank() * rows


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the full vocabulary of vocab-parallel logits [..., v/tp] -> [...] ids."""
    from megatron.core import parallel_state

    local_max, local_arg = logits.max(dim=-1)
    group = parallel_state.get_tensor_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return local_arg
    rank = torch.distributed.get_rank(group)
    global_arg = local_arg + rank * logits.shape[-1]
    maxes = [torch.empty_like(local_max) for _ in range(size)]
    args = [torch.empty_like(global_arg) for _ in range(size)]
    torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
    torch.distributed.all_gather(args, global_arg.contiguous(), group=group)
    best = torch.stack(maxes).argmax(dim=0)  # first rank wins ties, as a plain argmax would
    return torch.stack(args).gather(0, best.unsqueeze(0)).squeeze(0)
