"""Caption-head linear + cross-entropy that never materialises the [tokens, vocab] logits.

    loss[i] = logsumexp_v(hidden[i] @ weight[v]) - hidden[i] @ weight[labels[i]]   (0 where PAD)

hidden [t, d], weight [v, d] (bias-free head), labels [t] -> loss [t] fp32, num_valid (int64).

The tokens are processed in chunks of c rows. Forward keeps only three fp32 numbers per token
(row max, sum of exp(logit - max), target logit) and reduces them to lse = max + log(sumexp);
backward recomputes each chunk's logits and turns them, in place, into
dlogits = (softmax - onehot) * grad_loss before the two matmuls for grad_hidden and grad_weight.
At no point does more than one [c, v] chunk exist.

Why it pays (caption head of ViT-L/14 recipes: t = 256 images x 64 tokens = 16384, d = 768,
v = 32000, bf16)
----------------------------------------------------------------------------------------------
  memory   the plain path holds logits [t, v] (1.05 GB bf16), its log-softmax (1.05 GB, saved
           for backward) and in backward two more [t, v] gradients: ~3-4 GB for one loss,
           double that when logits are upcast to fp32 as megatron does. The chunked path holds
           one fp32 [c, v] chunk (c = 512: 65 MB), the saved [t] lse, and for low-precision
           weights an fp32 grad_weight accumulator (v*d*4 = 98 MB).
  FLOPs    plain 6*t*v*d = 2.4 TFLOP; chunked recomputes the logits in backward: 8*t*v*d,
           +33% of the head's FLOPs (~1 ms on an H200 at 790 TFLOP/s) for 3+ GB of memory.
  bytes    torch's softmax arithmetic walks each chunk in ~5 elementwise passes with fp32
           temporaries; the Triton kernels do one read pass in forward (online logsumexp and
           target pick) and one in-place read/write pass in backward. The matmuls stay on
           cuBLAS, which a hand-written Triton GEMM would not beat on an H200.

Vocab parallelism (megatron splits the head along v over tensor-parallel ranks)
---------------------------------------------------------------------------------
`vocab_parallel_linear_cross_entropy` takes rank r's shard weight[r*v_r:(r+1)*v_r] and the TP
process group. Each rank computes its per-token partials (max_r, sumexp_r, target_r; target_r
is 0 where the label lies in another shard), then three all-reduces over [t] floats combine
them exactly:  M = max_r max_r;  S = sum_r sumexp_r * exp(max_r - M);  T = sum_r target_r;
lse = M + log S. Backward needs no extra communication for grad_weight (each rank's dlogits
use the global lse) and one all-reduce of grad_hidden, the same one megatron's
ColumnParallelLinear does for its input gradient. The traffic is 3 * t fp32 + t * d instead of
gathering [t, v] logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.dispatch import use_triton

# One fp32 logits chunk is capped at this many bytes: 512 tokens at v = 32000.
CHUNK_BYTES = 64 << 20


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain path: full logits, then F.cross_entropy. -> (loss [t], num_valid)."""
    loss = F.cross_entropy(hidden @ weight.t(), labels, reduction="none", ignore_index=ignore_index)
    return loss, (labels != ignore_index).sum()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked linear + cross-entropy: hidden [t, d], weight [v, d], labels [t].

    Returns (loss [t] fp32 with 0 at ignore_index, num_valid int64 scalar tensor); the mean
    loss is loss.sum() / num_valid. `chunk_size` tokens per chunk (default: a 64 MiB fp32
    chunk); `backend` as in kernels.dispatch.
    """
    return vocab_parallel_linear_cross_entropy(
        hidden, weight, labels, group=None, ignore_index=ignore_index,
        chunk_size=chunk_size, backend=backend,
    )


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    vocab_start: int | None = None,
    return_hits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """As linear_cross_entropy, with the head split along v over `group` (megatron's layout:
    rank r holds vocab rows [r * v_r, (r + 1) * v_r)). hidden and labels are replicated over the
    group; the returned loss is the full-vocabulary loss on every rank. group=None: no split.

    `vocab_start`: the first vocabulary id of `weight_shard` (default rank * v_r), for a shard
    cut short: a head padded past the real vocabulary passes only its real rows, which keeps
    the padding out of the softmax as -inf logits would (a shard may then have none).
    `return_hits`: also return hits [t] bool, whether the label's logit is the row's maximum
    (a plain argmax, except that ties count as hits), False at ignore_index."""
    if hidden.dim() != 2 or weight_shard.dim() != 2 or hidden.shape[1] != weight_shard.shape[1]:
        raise ValueError(f"want hidden [t, d] and weight [v, d], got {tuple(hidden.shape)}, {tuple(weight_shard.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [t] with t = {hidden.shape[0]}")
    ops = _TritonChunkOps if use_triton(backend, hidden, weight_shard) else _TorchChunkOps
    chunk = chunk_size or max(1, CHUNK_BYTES // (4 * max(weight_shard.shape[0], 1)))
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * weight_shard.shape[0] if group is not None else 0
    loss, num_valid, hits = _LinearCrossEntropy.apply(hidden, weight_shard, labels, ignore_index,
                                                      chunk, group, ops, vocab_start)
    return (loss, num_valid, hits) if return_hits else (loss, num_valid)


class _TorchChunkOps:
    """Per-chunk softmax arithmetic in torch: the CPU path, and the spec the kernels meet."""

    @staticmethod
    def stats(logits, local, row_max, sumexp, target):
        x = logits.float()  # [c, v]
        m = x.amax(dim=1)  # [c]
        row_max.copy_(m)
        sumexp.copy_((x - m[:, None]).exp_().sum(dim=1))
        in_shard = (local >= 0) & (local < x.shape[1])
        picked = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
        target.copy_(torch.where(in_shard, picked, 0.0))

    @staticmethod
    def grad_(logits, local, lse, g):
        # fp32 logits are turned into dlogits in place; bf16/fp16 go through one fp32 copy.
        p = logits.float().sub_(lse[:, None]).exp_()  # [c, v] softmax
        in_shard = (local >= 0) & (local < p.shape[1])
        p.scatter_add_(1, local.clamp(0, p.shape[1] - 1)[:, None], -in_shard.float()[:, None])
        return p.mul_(g[:, None]).to(logits.dtype)


class _TritonChunkOps:
    """Per-chunk softmax arithmetic as two single-pass Triton kernels."""

    @staticmethod
    def stats(logits, local, row_max, sumexp, target):
        from kernels import _linear_cross_entropy_triton as tk

        tk.chunk_stats(logits, local, row_max, sumexp, target)

    @staticmethod
    def grad_(logits, local, lse, g):
        from kernels import _linear_cross_entropy_triton as tk

        return tk.chunk_grad_(logits, local, lse, g)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, group, ops, vocab_start):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        t, v = hidden.shape[0], weight.shape[0]
        local = labels.to(torch.int64) - vocab_start  # [t]; other shards' labels fall outside [0, v)
        row_max, sumexp, target = (torch.empty(t, dtype=torch.float32, device=hidden.device) for _ in range(3))
        if v == 0:  # a shard of vocabulary padding only: it adds nothing to the softmax
            row_max.fill_(float("-inf")), sumexp.zero_(), target.zero_()
        for lo in range(0, t if v else 0, chunk):
            hi = min(lo + chunk, t)
            logits = hidden[lo:hi] @ weight.t()  # [c, v], the only vocab-sized tensor alive
            ops.stats(logits, local[lo:hi], row_max[lo:hi], sumexp[lo:hi], target[lo:hi])
            del logits
        if group is not None:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            sumexp.mul_(torch.exp(row_max - global_max))  # rescale each shard to the global max
            dist.all_reduce(sumexp, group=group)
            dist.all_reduce(target, group=group)  # exactly one shard holds each target
            row_max = global_max
        lse = row_max + torch.log(sumexp)  # [t]
        valid = labels != ignore_index
        loss = torch.where(valid, lse - target, 0.0)
        num_valid = valid.sum()
        hits = valid & (target >= row_max)  # the owning shard's target is the picked logit
        ctx.save_for_backward(hidden, weight, local, lse, valid)
        ctx.chunk, ctx.group, ctx.ops = chunk, group, ops
        ctx.mark_non_differentiable(num_valid, hits)
        return loss, num_valid, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_num_valid, _grad_hits):
        hidden, weight, local, lse, valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = torch.where(valid, grad_loss.float(), 0.0)  # [t]; PAD tokens get no gradient
        grad_hidden = None
        if need_h:  # a shard of padding rows only adds zeros, but joins the all-reduce below
            grad_hidden = torch.empty_like(hidden) if weight.shape[0] else torch.zeros_like(hidden)
        # Low-precision weights accumulate over chunks in fp32, like megatron's main_grad:
        # t/c bf16 roundings of the accumulator would cost ~1% relative error at t = 16k.
        acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        for lo in range(0, hidden.shape[0] if weight.shape[0] else 0, ctx.chunk):
            hi = min(lo + ctx.chunk, hidden.shape[0])
            h = hidden[lo:hi]  # [c, d]
            dlogits = ctx.ops.grad_(h @ weight.t(), local[lo:hi], lse[lo:hi], g[lo:hi])  # [c, v]
            if need_h:
                torch.mm(dlogits, weight, out=grad_hidden[lo:hi])  # [c, d]
            if need_w and acc_dtype == dlogits.dtype:
                grad_weight.addmm_(dlogits.t(), h)  # [v, d], no temporary
            elif need_w:
                grad_weight.add_(dlogits.t() @ h)
            del dlogits
        if need_h and ctx.group is not None:
            # Each rank's grad_hidden covers only its vocab shard; the sum is the full gradient.
            dist.all_reduce(grad_hidden, group=ctx.group)
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None
