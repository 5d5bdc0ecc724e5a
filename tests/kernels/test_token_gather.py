"""token_gather: the Triton kernels against the torch reference, bit for bit.

Shapes are tiny because on CPU every kernel runs in Triton's interpreter (one Python-level
program per output row); the same tests run the compiled kernels on a GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

from kernels import (
    random_keep_indices,
    random_keep_indices_reference,
    random_token_gather,
    token_gather,
    token_gather_reference,
)
from kernels.dispatch import use_triton
from kernels.token_gather import keep_scores

# (s, b, h, k, prefix): h not a power of two, k = 1, k = N, no prefix, several registers.
SHAPES = [(17, 3, 40, 5, 1), (9, 2, 24, 1, 1), (8, 2, 7, 8, 0), (12, 3, 33, 8, 4)]
# Every shape in fp32; the half precisions on the first shape (the interpreter is slow).
CASES = [(shape, torch.float32) for shape in SHAPES] + [
    (SHAPES[0], torch.float16), (SHAPES[0], torch.bfloat16)]


def _keep_idx(b: int, num_patches: int, k: int, gen: torch.Generator) -> torch.Tensor:
    # Arbitrary (unsorted) order within each row: the op must not assume ascending indices.
    return torch.stack([torch.randperm(num_patches, generator=gen)[:k] for _ in range(b)])


def _gather_and_grad(fn, x, grad_out):
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(grad_out)
    return out.detach(), x.grad


def test_reference_is_the_definition():
    gen = torch.Generator().manual_seed(0)
    s, b, h, k, prefix = 10, 3, 5, 4, 2
    x = torch.randn(s, b, h, generator=gen)
    keep = _keep_idx(b, s - prefix, k, gen)
    out = token_gather_reference(x, keep, prefix)  # [k, b, h]
    expected = torch.stack([x[prefix + keep[i], i] for i in range(b)], dim=1)
    assert out.shape == (k, b, h) and out.is_contiguous()
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "shape,dtype", CASES, ids=["s{}b{}h{}k{}p{}-".format(*s) + str(d).split(".")[1] for s, d in CASES])
def test_triton_gather_matches_reference(triton_device, shape, dtype):
    s, b, h, k, prefix = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(s, b, h, generator=gen).to(triton_device, dtype)
    keep = _keep_idx(b, s - prefix, k, gen).to(triton_device)
    grad_out = torch.randn(k, b, h, generator=gen).to(triton_device, dtype)
    out, grad_x = _gather_and_grad(lambda t: token_gather(t, keep, prefix, backend="triton"), x, grad_out)
    ref_out, ref_grad = _gather_and_grad(lambda t: token_gather_reference(t, keep, prefix), x, grad_out)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, ref_out)
    assert torch.equal(grad_x, ref_grad)  # unique indices: scatter without atomics is exact
    assert grad_x[:prefix].abs().sum() == 0


def test_non_contiguous_input(triton_device):
    # A [b, s, h] tensor viewed as [s, b, h] (stride(2) == 1, s/b strides swapped).
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 9, 16, generator=gen).to(triton_device).transpose(0, 1)  # [s, b, h]
    keep = _keep_idx(3, 8, 3, gen).to(triton_device)
    assert torch.equal(token_gather(x, keep, 1, backend="triton"), token_gather_reference(x, keep, 1))


@pytest.mark.parametrize(
    "num_patches,num_keep,seed", [(37, 12, 0), (37, 12, 2**40 + 3), (16, 16, 1), (5, 1, 2), (256, 85, 3)])
def test_random_keep_kernel_equals_reference(triton_device, num_patches, num_keep, seed):
    sample_ids = torch.tensor([0, 1, 7, 2**33 + 5], device=triton_device)
    kernel = random_keep_indices(sample_ids, num_patches, num_keep, seed, backend="triton")
    ref = random_keep_indices_reference(sample_ids.cpu(), num_patches, num_keep, seed)
    assert torch.equal(kernel.cpu(), ref)


def test_random_keep_properties():
    n, k = 64, 21
    ids = torch.arange(3000)
    keep = random_keep_indices(ids, n, k, seed=17)  # CPU: the torch path
    assert keep.shape == (3000, k) and keep.dtype == torch.int64
    assert (keep.diff(dim=1) > 0).all()  # ascending, hence unique
    assert keep.min() >= 0 and keep.max() < n
    # Reproducible from (seed, sample id) alone, whatever the batch it arrives in.
    assert torch.equal(random_keep_indices(ids[5:8].flip(0), n, k, 17), keep[5:8].flip(0))
    assert not torch.equal(random_keep_indices(ids[:8], n, k, 18), keep[:8])
    # Every patch is kept with probability k/n: 3000 * 21/64 = 984 +- 26 (1 sigma).
    counts = torch.bincount(keep.flatten(), minlength=n).float()
    assert (counts - 3000 * k / n).abs().max() < 6 * 26
    # Keys are unique within a sample, so selection has no ties to break differently.
    scores = keep_scores(ids[:50], n, 17)
    assert all(row.unique().numel() == n for row in scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_token_gather_matches_reference(triton_device, dtype):
    s, b, h, k, prefix = 14, 3, 20, 4, 1
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(s, b, h, generator=gen).to(triton_device, dtype).requires_grad_()
    ids = torch.tensor([3, 4, 99], device=triton_device)
    out, keep = random_token_gather(x, ids, k, seed=5, prefix=prefix, backend="triton")
    out.backward(torch.ones_like(out))
    ref_keep = random_keep_indices_reference(ids.cpu(), s - prefix, k, 5)
    assert torch.equal(keep.cpu(), ref_keep)
    assert torch.equal(out, token_gather_reference(x.detach(), keep, prefix))
    kept_rows = torch.zeros(s, b, dtype=torch.bool)
    kept_rows[prefix + ref_keep.t(), torch.arange(b)] = True
    assert torch.equal(x.grad.cpu() != 0, kept_rows[:, :, None].expand(s, b, h))


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    assert not use_triton("auto", cpu)  # CPU always takes the torch path by default
    assert not use_triton("torch", cpu)
    with pytest.raises(ValueError, match="backend"):
        use_triton("cuda", cpu)
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton("triton", cpu)


def test_import_kernels_does_not_import_triton():
    # Also with triton made unimportable: the CPU paths work, and forcing Triton says why not.
    code = (
        "import sys\n"
        "import kernels, torch\n"
        "assert 'triton' not in sys.modules, 'import kernels imported triton'\n"
        "sys.modules['triton'] = None\n"
        "from kernels.dispatch import triton_available\n"
        "triton_available.cache_clear()\n"
        "assert not triton_available()\n"
        "x = torch.randn(5, 2, 3); keep = torch.tensor([[0, 2], [3, 1]])\n"
        "assert kernels.token_gather(x, keep, 1).shape == (2, 2, 3)\n"
        "try:\n"
        "    kernels.token_gather(x, keep, 1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('forced triton without triton did not raise')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, timeout=120)


@pytest.mark.gpu
def test_gpu_vit_l14_shapes():
    # ViT-L/14 @ 224: 1 CLS + 256 patches, keep 85, h = 1024, bf16, compiled kernels.
    s, b, h, k = 257, 64, 1024, 85
    x = torch.randn(s, b, h, device="cuda", dtype=torch.bfloat16)
    ids = torch.arange(b, device="cuda")
    grad_out = torch.randn(k, b, h, device="cuda", dtype=torch.bfloat16)
    out, grad_x = _gather_and_grad(
        lambda t: random_token_gather(t, ids, k, seed=0, prefix=1, backend="triton")[0], x, grad_out)
    keep = random_keep_indices_reference(ids.cpu(), s - 1, k, 0).cuda()
    ref_out, ref_grad = _gather_and_grad(lambda t: token_gather_reference(t, keep, 1), x, grad_out)
    assert torch.equal(out, ref_out) and torch.equal(grad_x, ref_grad)
