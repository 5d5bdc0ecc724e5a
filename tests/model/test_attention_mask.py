"""The local spec's attention mask (specs.mask_scores) against megatron's in-place one.

megatron's attention_mask_func fills the scores in place on a view of the baddbmm output, so
autograd routes the score gradient through a CopySlices node (five extra [b, np, s, s] passes).
specs.UnfusedAttention masks out of place instead; probabilities and gradients must be equal
bit for bit, and the backward graph must no longer hold the CopySlices node."""

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import attention_mask_func

from ov2_megatron.models import specs


def _probs(q, k, mask, mask_func, dtype):
    b, heads, s, d = q.shape
    scores = torch.baddbmm(torch.empty(b * heads, s, s, dtype=dtype),
                           q.to(dtype).reshape(b * heads, s, d),
                           k.to(dtype).reshape(b * heads, s, d).transpose(1, 2),
                           beta=0.0, alpha=d ** -0.5).view(b, heads, s, s)  # megatron's view
    return mask_func(scores, mask).float().softmax(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_place_mask_is_bitwise_megatrons(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 37, 16, generator=gen, requires_grad=True) for _ in range(2))
    mask = torch.ones(37, 37, dtype=torch.bool).triu(1)  # causal: True = hidden
    grad = torch.randn(2, 3, 37, 37, generator=gen)
    ref = _probs(q, k, mask, attention_mask_func, dtype)
    ref_grads = torch.autograd.grad(ref, (q, k), grad)
    out = _probs(q, k, mask, specs.mask_scores, dtype)
    assert "CopySlices" not in _graph_nodes(out) and "CopySlices" in _graph_nodes(ref)
    assert torch.equal(out, ref)
    for got, want in zip(torch.autograd.grad(out, (q, k), grad), ref_grads):
        assert torch.equal(got, want)


def test_local_spec_uses_the_out_of_place_mask():
    spec = specs.layer_spec("local", AttnMaskType.causal)
    assert spec.submodules.self_attention.submodules.core_attention is specs.UnfusedAttention


def _graph_nodes(tensor) -> set[str]:
    visited, names, todo = set(), set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names
