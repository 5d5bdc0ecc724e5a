"""TP=2 linear layers (with and without SP) and the vocab-parallel embedding + cross-entropy,
each against the same computation in plain PyTorch on every rank."""

import pytest
import torch

from tests.harness import run_distributed

HIDDEN, FFN, SEQ, BATCH, VOCAB = 16, 32, 8, 3, 64


def _setup(tp: int):
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    initialize(ParallelLayout(tensor=tp), seed=7)


def _config(sequence_parallel: bool):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, use_cpu_initialization=True,
        tensor_model_parallel_size=2, sequence_parallel=sequence_parallel,
    )


def tp_column_row_mlp(sequence_parallel: bool):
    """Column(h->f, gather off) then Row(f->h); compare against nn.Linear on full weights."""
    from megatron.core import parallel_state, tensor_parallel

    _setup(2)
    config = _config(sequence_parallel)
    init = torch.nn.init.xavier_normal_
    col = tensor_parallel.ColumnParallelLinear(
        HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False)
    row = tensor_parallel.RowParallelLinear(
        FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True,
        skip_bias_add=False)
    torch.manual_seed(0)  # same input on every rank
    x = torch.randn(SEQ, BATCH, HIDDEN)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local_x = x.chunk(2, dim=0)[tp_rank] if sequence_parallel else x
    local_x = local_x.clone().requires_grad_(True)
    h, _ = col(local_x)
    out, _ = row(torch.nn.functional.gelu(h))
    out.square().sum().backward()
    return dict(
        rank=tp_rank, out=out.detach(), x_grad=local_x.grad,
        col_w=col.weight.detach(), col_b=col.bias.detach(), row_w=row.weight.detach(),
        row_b=row.bias.detach(), col_w_grad=col.weight.grad, row_w_grad=row.weight.grad,
        row_b_grad=row.bias.grad)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_column_row_parallel_linear_equals_nn_linear(sequence_parallel):
    ranks = run_distributed(tp_column_row_mlp, 2, args=(sequence_parallel,))
    col_w = torch.cat([r["col_w"] for r in ranks], 0)  # column-parallel: split output rows
    col_b = torch.cat([r["col_b"] for r in ranks], 0)
    row_w = torch.cat([r["row_w"] for r in ranks], 1)  # row-parallel: split input columns
    row_b = ranks[0]["row_b"]
    torch.manual_seed(0)
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    w1 = col_w.clone().requires_grad_(True)
    w2 = row_w.clone().requires_grad_(True)
    b2 = row_b.clone().requires_grad_(True)
    ref = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, col_b)), w2, b2)
    ref.square().sum().backward()

    if sequence_parallel:
        out = torch.cat([r["out"] for r in ranks], 0)  # each rank holds its sequence shard
        x_grad = torch.cat([r["x_grad"] for r in ranks], 0)
        # The row bias is replicated; under SP each rank's grad is a partial sum over its
        # shard, which megatron's finalize_model_grads all-reduces over TP.
        row_b_grad = ranks[0]["row_b_grad"] + ranks[1]["row_b_grad"]
    else:
        out, x_grad, row_b_grad = ranks[0]["out"], ranks[0]["x_grad"], ranks[0]["row_b_grad"]
        torch.testing.assert_close(ranks[1]["out"], out, rtol=0, atol=0)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["col_w_grad"] for r in ranks], 0), w1.grad,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["row_w_grad"] for r in ranks], 1), w2.grad,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row_b_grad, b2.grad, rtol=1e-5, atol=1e-5)


def vocab_parallel_embedding_and_loss():
    from megatron.core import parallel_state, tensor_parallel

    _setup(2)
    config = _config(False)
    emb = tensor_parallel.VocabParallelEmbedding(
        VOCAB, HIDDEN, init_method=torch.nn.init.normal_, config=config)
    head = tensor_parallel.ColumnParallelLinear(
        HIDDEN, VOCAB, config=config, init_method=torch.nn.init.normal_, bias=False,
        gather_output=False)
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (SEQ, BATCH))
    labels = torch.randint(0, VOCAB, (SEQ, BATCH))
    logits, _ = head(emb(tokens))  # [s, b, v/tp]
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)  # [s, b]
    loss.mean().backward()
    return dict(rank=parallel_state.get_tensor_model_parallel_rank(), loss=loss.detach(),
                emb=emb.weight.detach(), head=head.weight.detach(),
                emb_grad=emb.weight.grad, head_grad=head.weight.grad)


def test_vocab_parallel_embedding_and_cross_entropy():
    ranks = run_distributed(vocab_parallel_embedding_and_loss, 2)
    emb = torch.cat([r["emb"] for r in ranks], 0).requires_grad_(True)
    head = torch.cat([r["head"] for r in ranks], 0).requires_grad_(True)
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (SEQ, BATCH))
    labels = torch.randint(0, VOCAB, (SEQ, BATCH))
    logits = torch.nn.functional.embedding(tokens, emb) @ head.t()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1),
                                            reduction="none").reshape(SEQ, BATCH)
    ref.mean().backward()
    for r in ranks:
        torch.testing.assert_close(r["loss"], ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["emb_grad"] for r in ranks], 0), emb.grad,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["head_grad"] for r in ranks], 0), head.grad,
                               rtol=1e-5, atol=1e-6)
