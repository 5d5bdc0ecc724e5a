"""The MLP activation of each stack is the official one with the GPU flags too.

megatron fuses bias + GELU only for `activation_func is F.gelu`, and its fused kernel is the
tanh approximation: with the GPU flags (bias_activation_fusion on) an exact-GELU ViT would
silently become tanh-GELU (the earlier GPU model was 1.3e-2 off the official loss that way).
Each stack's MLP is built here from specs.stack_config with the fused kernels on and off,
on CPU (megatron's fused kernels run as torch.compile'd code), and compared with the twin's
written-out GELU; the old flags are the control that must differ. The whole model with the
GPU flags is held to the official case by test_official_parity.py (--fused-kernels)."""

import torch

from tests.harness import run_distributed

WIDTH, MLP = 32, 64


def mlp_outputs():
    import torch.nn.functional as F
    from megatron.core.transformer.mlp import MLP as MegatronMLP
    from megatron.core.transformer.spec_utils import build_module

    from ov2_megatron.config import ModelConfig, ParallelConfig
    from ov2_megatron.models import specs
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.variants import TransformerShape

    initialize(ParallelLayout(), seed=0)
    shape = TransformerShape(WIDTH, 1, MLP, 4)
    x = torch.randn(5, 3, WIDTH, generator=torch.Generator().manual_seed(0)) * 2  # [s, b, w]
    weights = torch.Generator().manual_seed(1)
    fc1 = torch.randn(MLP, WIDTH, generator=weights) / WIDTH ** 0.5
    b1, fc2 = torch.randn(MLP, generator=weights), torch.randn(WIDTH, MLP, generator=weights)

    def run(config):
        spec = specs.layer_spec("local", None).submodules.mlp
        mlp = build_module(spec, config=config)
        assert isinstance(mlp, MegatronMLP)
        with torch.no_grad():
            mlp.linear_fc1.weight.copy_(fc1), mlp.linear_fc1.bias.copy_(b1)
            mlp.linear_fc2.weight.copy_(fc2), mlp.linear_fc2.bias.zero_()
            out, bias = mlp(x)
        return out + bias

    out = {}
    for approximate in ("none", "tanh"):
        for fused in (False, True):
            config = specs.stack_config(shape, 1, ModelConfig(), ParallelConfig(), torch.float32,
                                        gelu_approximate=approximate, fused_kernels=fused)
            out[approximate, fused] = (run(config), config.bias_activation_fusion)
    old = specs.stack_config(shape, 1, ModelConfig(), ParallelConfig(), torch.float32,
                             gelu_approximate="none", fused_kernels=True)
    old.activation_func, old.bias_activation_fusion = F.gelu, True  # the earlier GPU flags
    out["old"] = (run(old), True)
    return dict(out=out, x=x, fc1=fc1, b1=b1, fc2=fc2)


def test_each_stack_keeps_its_gelu_with_and_without_fused_kernels():
    from tests.reference.openvision2_reference import gelu

    (result,) = run_distributed(mlp_outputs, 1, timeout=240)
    x, fc1, b1, fc2 = result["x"], result["fc1"], result["b1"], result["fc2"]
    for key, (got, fusion_on) in result["out"].items():
        if key == "old":
            continue
        approximate, fused = key
        want = gelu(x @ fc1.T + b1, approximate) @ fc2.T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(key))
        # fusion serves only the tanh stack: megatron's fused bias-GELU is the tanh form
        assert fusion_on == (fused and approximate == "tanh"), key
    old, _ = result["out"]["old"]
    exact = gelu(x @ fc1.T + b1, "none") @ fc2.T
    assert (old - exact).abs().max() / exact.abs().max() > 1e-4  # the control fails
