"""megatron dist_checkpointing on CPU: a TransformerBlock saved at TP=2 loads at TP=1 (and
back at TP=2) with exactly the weights that were saved."""

import torch

from tests.harness import run_distributed

HIDDEN, HEADS, LAYERS = 16, 4, 2


def _block(tp: int, seed: int):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlock

    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    initialize(ParallelLayout(tensor=tp), seed=seed)
    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                               use_cpu_initialization=True, tensor_model_parallel_size=tp)
    return TransformerBlock(config, get_gpt_layer_local_spec())


def save(tp: int, directory: str):
    from megatron.core import dist_checkpointing

    from tests.distributed import tp_gather

    block = _block(tp, seed=1)
    dist_checkpointing.save(block.sharded_state_dict(), directory)
    return tp_gather.full_state(block)


def load(tp: int, directory: str):
    from megatron.core import dist_checkpointing

    from tests.distributed import tp_gather

    block = _block(tp, seed=2)  # different weights until the load
    before = tp_gather.full_state(block)
    block.load_state_dict(dist_checkpointing.load(block.sharded_state_dict(), directory))
    return before, tp_gather.full_state(block)


def test_save_tp2_load_tp1_and_tp2(tmp_path):
    saved = run_distributed(save, 2, args=(2, str(tmp_path)))[0]
    for tp in (1, 2):
        before, loaded = run_distributed(load, tp, args=(tp, str(tmp_path)))[0]
        assert loaded.keys() == saved.keys()
        for name, weight in saved.items():
            if weight.ndim > 1:
                assert not torch.equal(before[name], weight), name  # the load changed it
            torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0)
