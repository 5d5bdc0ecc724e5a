"""linear_cross_entropy: chunked torch and Triton paths against F.cross_entropy on full logits,
the vocab-parallel variant on two gloo ranks, and the peak-memory saving at vocab 32000."""

import pytest
import torch

from kernels import linear_cross_entropy, linear_cross_entropy_reference, vocab_parallel_linear_cross_entropy
from tests.harness import run_distributed

PAD = -100
BACKENDS = ["torch", "triton"]
# Token counts that are not a multiple of the chunk, a chunk larger than t, and one token per chunk.
CHUNKS = [8, 64, 1]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _problem(t=37, d=24, v=100, dtype=torch.float32, device="cpu", pad=PAD, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) / d**0.5 * 3  # logits of a few units, peaked softmax
    labels = torch.randint(0, v, (t,), generator=gen)
    labels[::5] = pad
    grad = torch.rand(t, generator=gen)  # a non-uniform upstream gradient per token
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device), grad.to(device)


def _loss_and_grads(fn, hidden, weight, labels, grad):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss, num_valid = fn(hidden, weight, labels)
    loss.backward(grad.to(loss.dtype))
    return loss.detach().float(), num_valid, hidden.grad.float(), weight.grad.float()


def _check(fn, problem, dtype, ignore_index=PAD):
    got = _loss_and_grads(fn, *problem)
    ref = _loss_and_grads(lambda h, w, y: linear_cross_entropy_reference(h, w, y, ignore_index), *problem)
    assert got[0].dtype == torch.float32
    assert int(got[1]) == int(ref[1])
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), got[::2] + got[3:], ref[::2] + ref[3:]):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    assert (got[0][problem[2] == ignore_index] == 0).all()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_torch_chunked_fp32(chunk):
    _check(lambda h, w, y: linear_cross_entropy(h, w, y, PAD, chunk, backend="torch"), _problem(), torch.float32)


@pytest.mark.parametrize("chunk", [8, 64])
def test_triton_fp32(triton_device, chunk):
    problem = _problem(device=triton_device)
    _check(lambda h, w, y: linear_cross_entropy(h, w, y, PAD, chunk, backend="triton"), problem, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(request, backend):
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    problem = _problem(dtype=torch.bfloat16, device=device)
    _check(lambda h, w, y: linear_cross_entropy(h, w, y, PAD, 8, backend=backend), problem, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_is_a_real_token_and_vocab_not_a_power_of_two(request, backend):
    # PAD = 0 is a valid vocabulary row: its logit must still be excluded from loss and grads.
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    problem = _problem(t=19, v=77, pad=0, device=device, seed=1)
    _check(lambda h, w, y: linear_cross_entropy(h, w, y, 0, 8, backend=backend), problem, torch.float32, 0)


def test_triton_chunk_ops_span_vocab_blocks_and_shards(triton_device):
    # v = 2500 takes two 2048-wide blocks (the second mostly padding) through the online
    # logsumexp; labels outside [0, v) are other shards' tokens and must give target 0.
    from kernels.linear_cross_entropy import _TorchChunkOps, _TritonChunkOps

    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(5, 2500, generator=gen) * 4).to(triton_device)
    local = torch.tensor([0, 2499, 2047, -3, 2500], device=triton_device)
    g = torch.rand(5, generator=gen).to(triton_device)
    stats = {}
    for ops in (_TorchChunkOps, _TritonChunkOps):
        out = [torch.empty(5, device=triton_device) for _ in range(3)]
        ops.stats(logits, local, *out)
        lse = out[0] + out[1].log()
        stats[ops] = out + [ops.grad_(logits.clone(), local, lse, g)]
    for got, ref in zip(stats[_TritonChunkOps], stats[_TorchChunkOps]):
        torch.testing.assert_close(got, ref, **TOL[torch.float32])
    assert (stats[_TritonChunkOps][2][3:] == 0).all()


def test_all_pad_and_frozen_weight():
    hidden, weight, labels, _ = _problem(t=6)
    labels[:] = PAD
    hidden.requires_grad_()
    loss, num_valid = linear_cross_entropy(hidden, weight, labels, chunk_size=4, backend="torch")
    loss.sum().backward()
    assert int(num_valid) == 0 and (loss == 0).all() and (hidden.grad == 0).all()
    assert weight.grad is None  # no grad_weight work for a frozen head


def test_default_chunk_targets_64_mib():
    from kernels.linear_cross_entropy import CHUNK_BYTES

    assert CHUNK_BYTES // (4 * 32000) == 524  # ~512 tokens per chunk at the caption vocab


def _tp_rank(dtype_name: str):
    """On each of two ranks: the loss and grads from this rank's vocab shard of the head.

    Where CUDA is, the harness's process group is NCCL, which reduces only tensors on the
    rank's own GPU: the problem is computed there, and comes back on the CPU."""
    import torch.distributed as dist

    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    hidden, weight, labels, grad = _problem(t=21, v=90, dtype=dtype, seed=3, device=device)  # same on every rank
    shard = weight.chunk(dist.get_world_size())[dist.get_rank()]
    group = dist.group.WORLD
    fn = lambda h, w, y: vocab_parallel_linear_cross_entropy(h, w, y, group, PAD, chunk_size=8, backend="torch")  # noqa: E731
    return tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in _loss_and_grads(fn, hidden, shard, labels, grad))


def test_vocab_parallel_two_ranks_match_full_vocab():
    # Labels fall in both shards; the combined loss and grad_hidden must be the full-vocab ones
    # on every rank, and each rank's grad_weight the matching rows of the full gradient.
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("two NCCL ranks need two GPUs (NCCL refuses two ranks on one device); "
                    "the CPU run of this test covers it on gloo")
    results = run_distributed(_tp_rank, world_size=2, args=("float32",), timeout=120)
    hidden, weight, labels, grad = _problem(t=21, v=90, seed=3)
    loss, num_valid, grad_h, grad_w = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, grad)
    for rank, (r_loss, r_valid, r_grad_h, r_grad_w) in enumerate(results):
        assert int(r_valid) == int(num_valid)
        torch.testing.assert_close(r_loss, loss, **TOL[torch.float32])
        torch.testing.assert_close(r_grad_h, grad_h, **TOL[torch.float32])
        torch.testing.assert_close(r_grad_w, grad_w.chunk(2)[rank], **TOL[torch.float32])


def _cuda_peak(impl: str, tokens: int, dim: int, vocab: int) -> dict:
    """One forward + backward of `impl` on CUDA tensors, measured by the allocator's counters
    (exact, so no fresh process is needed), as tools/bench_kernels.py measures it on CPU."""
    from ov2_megatron.perf.peak_memory import PeakMemory

    hidden, weight, labels, _ = _problem(t=tokens, d=dim, v=vocab, device="cuda")
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    fn = (linear_cross_entropy_reference if impl == "plain" else
          lambda h, w, y: linear_cross_entropy(h, w, y, backend="torch"))
    memory = PeakMemory("cuda")
    memory.baseline()
    memory.reset()
    loss, num_valid = fn(hidden, weight, labels)
    (loss.sum() / num_valid).backward()
    return {"impl": impl, "peak_bytes": memory.peak_bytes(), "method": memory.method,
            "loss": float(loss.sum() / num_valid)}


def test_peak_memory_at_vocab_32k_is_4x_lower():
    """Peak memory of forward+backward above the inputs: on CUDA the allocator's counters on
    CUDA tensors; on CPU fresh-process RSS high-water marks (method: tools/bench_kernels.py).

    d = 256 rather than 768 keeps the test at ~10 s on two cores; the ratio is set by the
    [t, v] logits, which do not depend on d (d = 768 measures 7.6x: see the tool)."""
    import os

    shape = dict(tokens=4096, dim=256, vocab=32000)
    if torch.cuda.is_available():
        plain, chunked = _cuda_peak("plain", **shape), _cuda_peak("chunked", **shape)
    else:
        if not os.access("/proc/self/clear_refs", os.W_OK):
            pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
        from tools.bench_kernels import measure_peak

        plain, chunked = measure_peak("plain", **shape), measure_peak("chunked", **shape)
    for row in (plain, chunked):  # no reading (None) or 0 bytes: nothing was measured
        assert row["peak_bytes"], f"{row['impl']}: no peak memory measured ({row.get('method', 'RSS')})"
    ratio = plain["peak_bytes"] / chunked["peak_bytes"]
    print(f"peak plain {plain['peak_bytes'] / 2**20:.0f} MiB, chunked {chunked['peak_bytes'] / 2**20:.0f} MiB: {ratio:.1f}x")
    assert plain["peak_bytes"] > 2 * 4096 * 32000 * 4  # sanity: plain holds >= two fp32 [t, v]
    assert ratio >= 4
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-5)


@pytest.mark.gpu
def test_gpu_caption_head_bf16_and_memory():
    # A realistic caption head on the compiled kernels: bf16 accuracy and the CUDA peak memory.
    problem = _problem(t=8192, d=768, v=32000, dtype=torch.bfloat16, device="cuda")

    from ov2_megatron.perf.peak_memory import PeakMemory

    def run(fn):
        memory = PeakMemory("cuda")
        memory.baseline()
        memory.reset()
        loss, _, grad_h, grad_w = _loss_and_grads(fn, *problem)
        return (loss, grad_h, grad_w), memory.peak_bytes()

    ref, plain_peak = run(linear_cross_entropy_reference)
    got, triton_peak = run(lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton"))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL[torch.bfloat16])
    assert plain_peak and triton_peak, (plain_peak, triton_peak)  # a reading, not 0 / None
    assert plain_peak >= 4 * triton_peak
