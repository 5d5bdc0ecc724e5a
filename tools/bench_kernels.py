"""Benchmarks for kernels/: peak memory of the chunked cross-entropy (CPU) and speed (CPU/GPU).

    python tools/bench_kernels.py memory --tokens 4096 --dim 768 --vocab 32000
    python tools/bench_kernels.py speed            # CUDA: Triton vs torch; CPU: torch paths

Peak memory is measured by the kernel, not by Python: each path runs in a fresh subprocess
that resets its resident-set high-water mark (`echo 5 > /proc/self/clear_refs`), runs forward
+ backward once, and reports VmHWM - VmRSS-before. Why this is sound for torch on CPU:
  - torch's CPU allocator is plain malloc with no caching, so freed tensors leave the process;
  - the subprocess runs with MALLOC_MMAP_THRESHOLD_=65536, which pins glibc's mmap threshold
    (it otherwise grows up to 32 MB after frees), so every tensor >= 64 KiB is its own mapping,
    counted in RSS when written and returned to the kernel on free, and MKL_DISABLE_FAST_MM=1
    (ov2_megatron/perf/peak_memory.py holds the method, shared with tools/bench.py);
  - every tensor here is written in full, so touched pages == allocated bytes;
  - the inputs exist before the baseline, and a small warm-up run first pays one-time costs
    (BLAS and OpenMP workspaces) so they are not charged to either path.
tracemalloc would see none of this (torch allocates outside Python's allocator), and
torch.profiler's CPU memory events miss allocations made off the profiled thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import linear_cross_entropy, linear_cross_entropy_reference, token_gather, token_gather_reference  # noqa: E402
from ov2_megatron.perf.peak_memory import PeakMemory, pinned_environment  # noqa: E402

IMPLS = ("plain", "chunked")


def _loss_fn(impl: str, chunk_size: int | None):
    if impl == "plain":
        return lambda h, w, y: linear_cross_entropy_reference(h, w, y)
    return lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=chunk_size, backend="torch")


def _inputs(tokens: int, dim: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::7] = -100  # some PAD, as in real captions
    return hidden, weight, labels


def probe_peak(impl: str, tokens: int, dim: int, vocab: int, chunk_size: int | None) -> dict:
    """Run in a fresh process: peak RSS growth (bytes) of one forward + backward of `impl`."""
    fn = _loss_fn(impl, chunk_size)
    small = _inputs(64, dim, 1024)
    fn(*small)[0].sum().backward()  # warm-up: thread pools, BLAS workspaces
    hidden, weight, labels = _inputs(tokens, dim, vocab)
    del small
    memory = PeakMemory("cpu")  # _inputs makes CPU tensors, also on a GPU machine
    memory.baseline()
    memory.reset()  # VmHWM := VmRSS
    start = time.perf_counter()
    loss, num_valid = fn(hidden, weight, labels)
    (loss.sum() / num_valid).backward()
    seconds = time.perf_counter() - start
    peak = memory.peak_bytes()
    return {"impl": impl, "peak_bytes": peak, "seconds": seconds, "loss": float(loss.sum() / num_valid)}


def measure_peak(impl: str, tokens: int, dim: int, vocab: int, chunk_size: int | None = None) -> dict:
    """probe_peak in a fresh subprocess with the pinned allocator environment (module docstring)."""
    env = pinned_environment()
    cmd = [sys.executable, os.path.abspath(__file__), "probe", impl, "--tokens", str(tokens),
           "--dim", str(dim), "--vocab", str(vocab)]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_table(tokens: int, dim: int, vocab: int, chunk_size: int | None) -> None:
    rows = {impl: measure_peak(impl, tokens, dim, vocab, chunk_size) for impl in IMPLS}
    logits_mib = tokens * vocab * 4 / 2**20
    print(f"linear+CE fwd+bwd  t={tokens} d={dim} v={vocab} (fp32 logits {logits_mib:.0f} MiB)")
    for impl, row in rows.items():
        print(f"  {impl:8s} peak {row['peak_bytes'] / 2**20:8.1f} MiB  {row['seconds']:6.2f} s  loss {row['loss']:.5f}")
    print(f"  ratio    {rows['plain']['peak_bytes'] / rows['chunked']['peak_bytes']:.2f}x less peak memory")


def _time(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def speed_table() -> None:
    """ms per forward + backward. CUDA: the real shapes, bf16; CPU: small shapes, fp32."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    t, d, v = (16384, 768, 32000) if cuda else (1024, 256, 32000)
    hidden = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, device=device, dtype=dtype) / d**0.5).requires_grad_()
    labels = torch.randint(0, v, (t,), device=device)
    ce = {"plain": lambda: linear_cross_entropy_reference(hidden, weight, labels)[0].sum().backward(),
          "chunked torch": lambda: linear_cross_entropy(hidden, weight, labels, backend="torch")[0].sum().backward()}
    s, b, h, k = (257, 256, 1024, 85) if cuda else (65, 32, 256, 21)
    x = torch.randn(s, b, h, device=device, dtype=dtype, requires_grad=True)
    keep = torch.rand(b, s - 1, device=device).argsort(dim=1)[:, :k]
    gather = {"torch": lambda: token_gather_reference(x, keep, 1).sum().backward()}
    if cuda:
        ce["chunked triton"] = lambda: linear_cross_entropy(hidden, weight, labels, backend="triton")[0].sum().backward()
        gather["triton"] = lambda: token_gather(x, keep, 1, backend="triton").sum().backward()
    print(f"{device} {dtype}: ms per forward+backward")
    for name, fn in ce.items():
        print(f"  linear+CE  t={t} d={d} v={v}  {name:15s} {_time(fn, 5):8.2f}")
    for name, fn in gather.items():
        print(f"  gather     s={s} b={b} h={h} k={k}  {name:15s} {_time(fn, 20):8.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("memory", "speed", "probe"))
    parser.add_argument("impl", nargs="?", choices=IMPLS, help="probe only")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe_peak(args.impl, args.tokens, args.dim, args.vocab, args.chunk_size)))
    elif args.command == "memory":
        memory_table(args.tokens, args.dim, args.vocab, args.chunk_size)
    else:
        speed_table()


if __name__ == "__main__":
    main()
