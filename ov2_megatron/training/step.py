"""One training (or evaluation) step: micro-batches through megatron's pipeline schedule.

The caption loss is a mean over caption tokens of the *global* batch: each micro-batch
returns its token-loss sum and token count (`calculate_per_token_loss`), megatron's
finalize_model_grads divides the gradients by the global token count, and we report the
same ratio. So the result does not depend on micro-batching or on the DP/PP layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from ov2_megatron.data.bad_data import BadDataError
from ov2_megatron.models.token_drop import keep_indices


@dataclass
class MicroBatch:
    images: torch.Tensor | None  # [b, 3, R, R]; None on stages after the first
    tokens: torch.Tensor  # [b, L]
    keep_idx: torch.Tensor  # [b, k]


class BatchStream:
    """Micro-batches of one replica, each with its token-drop indices.

    An example's indices come from its position in the global sample stream, so every
    TP/PP rank of a replica derives the same ones and a resumed run repeats them. With a
    `shared` ReplicaInput only the replica's reader has a loader (replica_input.py); the
    other ranks pass None and receive the tensors their stage reads."""

    def __init__(self, loader, geom, seed: int, micro_batch: int, micro_batches: int,
                 dp_rank: int, device: torch.device, shared=None):
        self.loader, self.geom, self.seed = loader, geom, seed
        self.micro_batch, self.micro_batches = micro_batch, micro_batches
        self.dp_rank, self.device, self.shared = dp_rank, device, shared
        self._iter = iter(loader) if loader is not None else None

    def step_batches(self, step: int) -> tuple[list[MicroBatch], float]:
        """The micro-batches of optimizer step `step` (0-based) and the seconds spent waiting."""
        start = time.perf_counter()
        rows = self.micro_batch * self.micro_batches
        base = (step * parallel_state.get_data_parallel_world_size() + self.dp_rank) * rows
        items, failure = [], ""
        if self._iter is not None:
            try:
                items = [next(self._iter) for _ in range(self.micro_batches)]
            except BadDataError as error:
                failure = str(error)
        stop_together_on_bad_data(failure, self.device)
        images = [item["images"].to(self.device, non_blocking=True) for item in items]
        tokens = [item["tokens"].to(self.device, non_blocking=True) for item in items]
        if self.shared is not None and self.shared.model_parallel:
            # One broadcast per tensor for the whole step, then the micro-batches as views.
            step_images, step_tokens = self.shared.share(
                torch.cat(images) if items else None,  # [M*b, 3, R, R]
                torch.cat(tokens) if items else None, rows)  # [M*b, L]
            tokens = list(step_tokens.split(self.micro_batch))
            images = [None] * self.micro_batches if step_images is None else \
                list(step_images.split(self.micro_batch))
        batches = []
        for i in range(self.micro_batches):
            index = torch.arange(base + i * self.micro_batch, base + (i + 1) * self.micro_batch)
            keep = keep_indices(index, self.geom.num_patches, self.geom.num_kept, self.seed)
            batches.append(MicroBatch(images[i], tokens[i],
                                      keep.to(self.device, non_blocking=True)))
        return batches, time.perf_counter() - start


def stop_together_on_bad_data(failure: str, device: torch.device) -> None:
    """Raise BadDataError on every rank, with the first failing rank's message, when any
    rank's loader gave up (a whole window of bad samples). Each rank reads other samples, so
    one may give up alone; the others would wait for it in the step's first collective until
    the process-group timeout. The price is one 1-element all-reduce per step, before any
    compute is queued (the device is idle there after the previous step's stop agreement)."""
    flag = torch.tensor([1.0 if failure else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, failure)
    rank, message = next((r, m) for r, m in enumerate(messages) if m)
    raise BadDataError(f"rank {rank}: {message}")


def forward_step(data_iterator, model):
    batch: MicroBatch = next(data_iterator)
    sums = model(batch.images, batch.tokens, batch.keep_idx)

    def loss_func(out):
        weight = unwrap_model(model).loss_weight
        loss = weight * out["loss_sum"]
        report = torch.stack([out["loss_sum"].detach().double(), out["num_tokens"].double(),
                              out["correct"].double()])
        return loss, out["num_tokens"].to(torch.int), {"sums": report}

    return sums, loss_func


def run_schedule(chunks: list, batches: list[MicroBatch], geom, micro_batch: int,
                 forward_only: bool) -> torch.Tensor:
    """Forward(+backward) over the step's micro-batches; returns global
    [loss_sum, num_tokens, correct] on every rank (float64)."""
    iterators = [iter(batches) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
        seq_length=geom.decoder_seq, micro_batch_size=micro_batch, forward_only=forward_only)
    totals = torch.zeros(3, dtype=torch.float64)
    contributes = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                   and parallel_state.get_tensor_model_parallel_rank() == 0)
    if contributes:  # TP ranks of the last stage hold copies: count one of them per replica
        for item in outputs:
            totals += item["sums"].cpu()
    if torch.cuda.is_available():
        totals = totals.cuda()
    dist.all_reduce(totals)
    return totals.cpu()
