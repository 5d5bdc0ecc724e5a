"""One image pipeline per replica: its first rank decodes, the others receive what they use.

Every rank of one replica (its TP x PP ranks) trains on the same batch. Decoding it on each
of them costs TP x PP times the CPU and GPU decode work (vit_1b at TP=2: twice; a TP=2 x
PP=16 layout: 32 times). So only the replica's first rank (TP rank 0 of pipeline stage 0,
megatron's model-parallel source rank) runs the loader, and after each step's batches are
drawn it sends, as Megatron-LM does:
  tokens [M*b, L] int64       to every rank of the replica (one broadcast over the
                              model-parallel group): the decoder's input and the loss targets
                              live on whichever stages hold the boundary and the head;
  images [M*b, 3, R, R] fp32  to the TP ranks of pipeline stage 0 only (the patch embedding's
                              stage); later stages never read pixels and get none.
The kept-token indices are not sent: each rank draws them from the global sample positions
(token_drop.keep_indices), the same on every rank. One broadcast per tensor per step covers
all M micro-batches. Evaluation batches (validation, the linear probe) travel the same way,
with their row counts and captions sent first. The batches are those every rank drew before, so losses are unchanged
(tests/training/test_equivalence.py holds the layouts to one another).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def reads_data() -> bool:
    """Whether this rank runs its replica's loader (the model-parallel source rank)."""
    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_pipeline_model_parallel_rank() == 0)


class NotReading:
    """The loader of a rank that does not read: no stream, no state to save, no counts (the
    reader of its replica saves and reports them)."""

    decoding = "decoded by the replica's first rank"
    passthrough = True

    def stats(self) -> dict:
        return {}

    def state(self) -> None:
        return None


class ReplicaInput:
    """Shares each step's input from the replica's reader (see the module docstring)."""

    def __init__(self, image_shape: tuple[int, int, int], token_len: int,
                 device: torch.device):
        self.image_shape, self.token_len, self.device = image_shape, token_len, device
        self.model_parallel = (parallel_state.get_tensor_model_parallel_world_size()
                               * parallel_state.get_pipeline_model_parallel_world_size()) > 1
        if not self.model_parallel:
            return
        self.replica_group = parallel_state.get_model_parallel_group()
        self.stage0_tp_group = parallel_state.get_tensor_model_parallel_group()
        self.first_stage = parallel_state.get_pipeline_model_parallel_rank() == 0
        # The reader's global rank, found once by asking (not from megatron's rank order).
        self.reader = _member_where(reads_data(), self.replica_group)
        self.tp_source = _member_where(parallel_state.get_tensor_model_parallel_rank() == 0,
                                       self.stage0_tp_group)

    def share(self, images: torch.Tensor | None, tokens: torch.Tensor | None,
              rows: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(images or None, tokens) of this step on this rank. The reader passes its
        tensors; the others pass None and get what their stage reads."""
        if not self.model_parallel:
            return images, tokens
        if tokens is None:
            tokens = torch.empty(rows, self.token_len, dtype=torch.int64, device=self.device)
        dist.broadcast(tokens, src=self.reader, group=self.replica_group)
        if not self.first_stage:
            return None, tokens
        if dist.get_world_size(self.stage0_tp_group) > 1:
            if images is None:
                images = torch.empty(rows, *self.image_shape, dtype=torch.float32,
                                     device=self.device)
            dist.broadcast(images, src=self.tp_source, group=self.stage0_tp_group)
        return images, tokens


    def share_items(self, items: list[dict] | None) -> list[dict]:
        """Evaluation batches ({"images", "tokens", "captions"}, each of its own row count: bad
        rows are dropped) from the reader to the replica: the row counts and captions as one
        object broadcast, then each batch's tensors as in `share`."""
        if not self.model_parallel:
            return items
        reader = items is not None
        meta = [[(len(item["tokens"]), item["captions"]) for item in items] if reader else None]
        dist.broadcast_object_list(meta, src=self.reader, group=self.replica_group)
        shared = []
        for i, (rows, captions) in enumerate(meta[0]):
            images, tokens = (items[i]["images"].to(self.device), items[i]["tokens"].to(
                self.device)) if reader else (None, None)
            images, tokens = self.share(images, tokens, rows)
            shared.append({"images": images, "tokens": tokens, "captions": captions})
        return shared


def _member_where(flag: bool, group) -> int:
    """The global rank of the one member of `group` whose `flag` is True."""
    flags: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(flags, flag, group=group)
    return dist.get_process_group_ranks(group)[flags.index(True)]


__all__ = ["NotReading", "ReplicaInput", "reads_data"]
