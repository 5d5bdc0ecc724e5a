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
        # and a plain state dict's names are mapped both ways by the load path
        for stack in ("vision_layers", "decoder_layers"):
            te_name, local_name = f"{stack}.layers.3.{te}", f"{stack}.layers.3.{local}"
            assert state_dict_adapter.other_spec_name(te_name) == local_name
            assert state_dict_adapter.other_spec_name(local_name) == te_name
    for same in ("vision_layers.layers.0.self_attention.linear_qkv.weight",
                 "decoder_layers.final_layernorm.weight", "embedding.cls_token"):
        assert state_dict_adapter.other_spec_name(same) is None


def test_fused_softmax_only_where_its_extension_exists(monkeypatch):
    import importlib.machinery
    import sys

    import torch

    from ov2_megatron.config import ModelConfig, ParallelConfig
    from ov2_megatron.variants import TransformerShape

    def config():
        return specs.stack_config(TransformerShape(32, 1, 64, 4), 1, ModelConfig(),
                                  ParallelConfig(), torch.float32, fused_kernels=True)

    assert not specs.fused_softmax_available()  # no Apex extensions on this machine
    assert config().masked_softmax_fusion is False and config().bias_dropout_fusion is True
    for name in specs.FUSED_SOFTMAX_MODULES:  # as if Apex had built them
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    assert config().masked_softmax_fusion is True


def test_sequence_parallel_with_the_local_spec_needs_apex_on_gpus():
    with pytest.raises(ValueError, match="needs Apex's fused LayerNorm on GPUs"):
        specs.check_sequence_parallel_norm("local", True, on_gpu=True, apex=False)
    specs.check_sequence_parallel_norm("local", True, on_gpu=True, apex=True)
    specs.check_sequence_parallel_norm("transformer_engine", True, on_gpu=True, apex=False)
    specs.check_sequence_parallel_norm("local", True, on_gpu=False, apex=False)  # cpu_backend
    specs.check_sequence_parallel_norm("local", False, on_gpu=True, apex=False)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_compute(tmp_path):
    from ov2_megatron.data.tokenizer import CaptionTokenizer, train_tokenizer
    from ov2_megatron.recipes import get_recipe
    from ov2_megatron.training.data_sources import check_tokenizer_fits

    words = [f"word{i}" for i in range(60)]
    path = train_tokenizer((" ".join(words[i:] + words[:i]) for i in range(200)),
                           str(tmp_path / "sp"), vocab_size=80)
    pieces = CaptionTokenizer.from_file(path).vocab_size
    run = get_recipe("tiny_cpu")
    run.data.tokenizer_model = path
    run.model.decoder.vocab_size = pieces
    check_tokenizer_fits(run)
    run.model.decoder.vocab_size = pieces - 1
    with pytest.raises(ValueError, match=f"has {pieces} pieces but model.decoder.vocab_size is "
                                         f"{pieces - 1}"):
        check_tokenizer_fits(run)
    run.model.decoder.vocab_size, run.model.decoder.pad_id = pieces, 5
    with pytest.raises(ValueError, match="pads with id 0 but model.decoder.pad_id is 5"):
        check_tokenizer_fits(run)
