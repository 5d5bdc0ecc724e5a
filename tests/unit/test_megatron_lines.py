"""Names that differ between megatron-core releases and between the local and TE specs,
looked up the way the code does (issue #12): the checkpoint writer's queue factory (renamed in
0.17) and the TE spec's fused-norm parameter names."""

import types

import pytest

from ov2_megatron.models import specs, state_dict_adapter
from ov2_megatron.parallel.pipeline_split import StagePlan
from ov2_megatron.training import checkpoint


def test_writer_queue_factory_found_under_either_name():
    new, old = (lambda mp_mode="spawn": "new"), (lambda: "old")
    assert checkpoint.write_results_queue_factory(
        types.SimpleNamespace(get_write_results_queue=new))() == "new"  # 0.17+
    assert checkpoint.write_results_queue_factory(
        types.SimpleNamespace(_get_write_results_queue=old))() == "old"  # 0.16
    with pytest.raises(RuntimeError, match="neither get_write_results_queue"):
        checkpoint.write_results_queue_factory(types.SimpleNamespace())
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert callable(checkpoint.write_results_queue_factory(filesystem_async))  # this line's


# TE's LayerNormLinear registers its norm as `layer_norm_weight` / `layer_norm_bias`
# (transformer_engine/pytorch/module/layernorm_linear.py); megatron's TE spec puts one in
# linear_qkv (before attention) and one in linear_fc1 (before the MLP).
TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "ln1.weight",
            "self_attention.linear_qkv.layer_norm_bias": "ln1.bias",
            "mlp.linear_fc1.layer_norm_weight": "ln2.weight",
            "mlp.linear_fc1.layer_norm_bias": "ln2.bias"}


def test_te_fused_norm_names_map_to_the_local_norms():
    plan = StagePlan((0, 2), (0, 2), True, True, True)
    for te, std in TE_NAMES.items():
        assert state_dict_adapter.standard_name(f"vision_layers.layers.1.{te}", plan) == \
            f"vision.blocks.1.{std}"
        local = te.replace("self_attention.linear_qkv.layer_norm_", "input_layernorm.") \
            .replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
        assert state_dict_adapter.standard_name(f"decoder_layers.layers.0.{local}", plan) == \
            state_dict_adapter.standard_name(f"decoder_layers.layers.0.{te}", plan)
        # the checkpoint key map of the local spec names the same TE tensor
        prefix = next(k for k in specs._LOCAL_TO_TE_NORM_KEYS if local.startswith(k))
        assert local.replace(prefix, specs._LOCAL_TO_TE_NORM_KEYS[prefix]) == te
