"""Greedy caption generation for the demo and evaluation (single-chunk models).

The decoder runs on a fixed-length caption (the sequence geometry is fixed for SP/FP8
alignment), so each step re-runs the model on the caption so far padded with PAD and reads
the logits at the newest position: the causal text mask makes later PADs invisible to it.
Generation fills slots 1 .. L-2, the ones training supervises (the official layout keeps
slot L-1 PAD). O(L) full forwards: fine for evaluation batches, not for serving.
"""

from __future__ import annotations

import torch

from ov2_megatron.models.openvision2 import OpenVision2


@torch.no_grad()
def greedy_captions(model: OpenVision2, images: torch.Tensor, keep_idx: torch.Tensor,
                    bos_id: int, eos_id: int, caption_length: int) -> torch.Tensor:
    """images [b, c, H, W] -> token ids [b, caption_length]: BOS, generated ids, then PAD."""
    batch = images.shape[0]
    tokens = torch.full((batch, caption_length), model.pad_id, dtype=torch.long,
                        device=images.device)
    tokens[:, 0] = bos_id
    finished = torch.zeros(batch, dtype=torch.bool, device=images.device)
    for position in range(caption_length - 2):
        logits = model.caption_logits(images, tokens, keep_idx)  # [b, t, v]
        next_token = logits[:, position].argmax(dim=-1)
        next_token = torch.where(finished, torch.full_like(next_token, model.pad_id), next_token)
        tokens[:, position + 1] = next_token
        finished |= next_token == eos_id
        if bool(finished.all()):
            break
    return tokens
