"""Layer choice in one place: megatron ModuleSpecs (local vs Transformer Engine) and the
TransformerConfig each stack is built with.

Both specs build the same pre-LN layer (LN -> self-attention -> residual, LN -> GELU MLP ->
residual, biases on), with the GELU each tower's config names: exact (erf) in the ViT,
tanh-approximated in the decoder, as the official model. The activation is chosen here for
both specs and for the fused and unfused kernels alike, so CPU, GPU-local and TE runs compute
the same function. The local spec uses megatron's own parallel linears and torch
LayerNorm (CPU and plain GPU); the TE spec fuses each LayerNorm into the following linear
and is required for FP8. Their checkpoints are interchangeable: the local spec maps its norm
names onto TE's fused names in the sharded state dict (as megatron's GPT specs do).
"""

from __future__ import annotations

import copy
import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ov2_megatron.config import ModelConfig, ParallelConfig
from ov2_megatron.variants import TransformerShape

_LOCAL_TO_TE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def transformer_engine_available() -> bool:
    """TE imports only with CUDA and its driver; never import it on CPU machines."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


# megatron's fused softmax (fusions/fused_softmax.py) imports these CUDA extensions, which
# Apex builds; without them a bf16 step with masked_softmax_fusion on dies on the import.
FUSED_SOFTMAX_MODULES = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                         "scaled_softmax_cuda")


def fused_softmax_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in FUSED_SOFTMAX_MODULES)


def apex_available() -> bool:
    return importlib.util.find_spec("apex") is not None


def resolve_impl(requested: str, sequence_parallel: bool = False) -> str:
    impl = requested
    if requested == "auto":
        impl = "transformer_engine" if transformer_engine_available() else "local"
    elif requested == "transformer_engine" and not transformer_engine_available():
        raise ValueError("transformer_impl 'transformer_engine' needs CUDA and Transformer "
                         "Engine (NGC PyTorch containers ship it); use 'local' or 'auto'")
    check_sequence_parallel_norm(impl, sequence_parallel, torch.cuda.is_available(),
                                 apex_available())
    return impl


def check_sequence_parallel_norm(impl: str, sequence_parallel: bool, on_gpu: bool,
                                 apex: bool) -> None:
    """On GPUs, sequence parallelism needs a LayerNorm that knows it (TE's or Apex's): megatron's
    torch LayerNorm refuses it, and only the CPU layer (cpu_backend) makes it work on CPU."""
    if sequence_parallel and on_gpu and impl == "local" and not apex:
        raise ValueError("parallel.sequence_parallel with transformer_impl 'local' needs Apex's "
                         "fused LayerNorm on GPUs, and Apex is not installed: use "
                         "transformer_impl 'transformer_engine' (or 'auto' where TE is), "
                         "install Apex, or turn sequence parallelism off")


def layer_spec(impl: str, mask: AttnMaskType) -> ModuleSpec:
    """The transformer layer for `impl` ('local' or 'transformer_engine') and mask type."""
    if impl == "transformer_engine":
        return _te_layer_spec(mask)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=_local_norm(),
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=UnfusedAttention,
                    linear_proj=RowParallelLinear, q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=_local_norm(),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(_LOCAL_TO_TE_NORM_KEYS),
        ),
    )


class UnfusedAttention(DotProductAttention):
    """megatron's unfused attention (baddbmm -> mask -> softmax -> bmm), masking out of place.

    megatron's torch softmax path masks with `attention_mask_func`, an in-place masked_fill_
    on a view of the baddbmm output. Autograd records that as a CopySlices node, whose
    backward pushes the whole [b, np, s, s] score gradient through new_zeros, two copies, a
    clone and a copy back before the one masked_fill that matters: five s^2 passes per
    masked layer (the causal decoder; the ViT is unmasked), no FLOPs, growing with the
    decoder sequence and so with the keep ratio (docs/benchmarks/2026-12-02-keep-ratio-cost.md).
    Masked by one out-of-place select, the backward is one select of the gradient: the same
    values, bit for bit. The fused CUDA softmax (and TE) never call mask_func."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_mask_softmax.mask_func = mask_scores


def mask_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """megatron's attention_mask_func (hidden scores -> -10000) as one out-of-place select:
    one pass forward and one backward (masked_fill would clone first, then fill)."""
    return torch.where(mask, -10000.0, scores)


def _local_norm():
    """Apex's fused LayerNorm where present (GPU containers), else torch's."""
    try:
        import apex  # noqa: F401
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return FusedLayerNorm
    except ImportError:
        return WrappedTorchNorm


def _te_layer_spec(mask: AttnMaskType) -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention, linear_proj=TERowParallelLinear,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (flax's `nn.gelu` default, the official decoder's)."""
    return F.gelu(x, approximate="tanh")


def _activation(gelu_approximate: str, fused: bool) -> dict:
    """megatron's MLP fuses bias + activation only when `activation_func is F.gelu`, and its
    fused kernel (fusions/fused_bias_gelu.py) is the *tanh* form. So the fusion may serve a
    tanh stack, never an exact one: with it, an exact-GELU ViT would silently become tanh."""
    if gelu_approximate == "tanh":
        if fused:
            return dict(activation_func=F.gelu, bias_activation_fusion=True)
        return dict(activation_func=gelu_tanh, bias_activation_fusion=False)
    return dict(activation_func=F.gelu, bias_activation_fusion=False)  # exact (erf) GELU


def stack_config(shape: TransformerShape, num_layers: int, model: ModelConfig,
                 parallel: ParallelConfig, params_dtype: torch.dtype,
                 recompute: str = "none", gelu_approximate: str = "none",
                 fused_kernels: bool | None = None) -> TransformerConfig:
    """TransformerConfig for one stage's stack of `num_layers` layers.

    Pipeline placement is ours (pipeline_split.py), so each stack is built as a one-stage
    model; the schedules get `schedule_config()` instead. `fused_kernels` (default: on where
    CUDA is) turns on megatron's fused bias-activation, bias-dropout-add and masked-softmax
    kernels; the tests turn them on on CPU too, where they run as torch.compile'd code."""
    on_gpu = torch.cuda.is_available()
    fused = on_gpu if fused_kernels is None else fused_kernels
    fp8_kwargs = {}
    if model.fp8 == "nvfp4":
        fp8_kwargs = dict(fp4="e2m1", fp4_recipe="nvfp4")
    elif model.fp8:
        # hybrid: E4M3 forward, E5M2 gradients (the standard training split).
        fp8_kwargs = dict(fp8="hybrid", fp8_recipe=model.fp8)
    return TransformerConfig(
        num_layers=max(num_layers, 1),
        hidden_size=shape.width,
        ffn_hidden_size=shape.mlp_dim,
        num_attention_heads=shape.num_heads,
        layernorm_epsilon=model.layernorm_eps,
        init_method_std=model.init_std,
        add_bias_linear=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # The fused kernels compute the same function as their unfused forms (the activation
        # is handled by _activation); the fused softmax only where its extension exists.
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused and fused_softmax_available(),
        apply_rope_fusion=False,
        attention_softmax_in_fp32=True,
        **_activation(gelu_approximate, fused),
        **_recompute_kwargs(recompute),
        **fp8_kwargs,
    )


def _recompute_kwargs(recompute: str) -> dict:
    """Activation recomputation. It must be in the config when the layers are built: megatron's
    attention decides at construction whether to checkpoint its core ('selective')."""
    if recompute == "selective":  # recompute softmax(QK^T)V: the s^2 activations, cheap FLOPs
        return dict(recompute_granularity="selective")
    if recompute == "full":  # recompute every layer from its input in the backward pass
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    return {}


def schedule_config(decoder: TransformerShape, model: ModelConfig, parallel: ParallelConfig,
                    params_dtype: torch.dtype) -> TransformerConfig:
    """The config megatron's pipeline schedules read from the model: p2p and loss settings."""
    chunks = parallel.pipeline * (parallel.virtual_pipeline or 1)
    config = stack_config(decoder, chunks, model, parallel, params_dtype)
    config = copy.copy(config)
    config.pipeline_model_parallel_size = parallel.pipeline
    config.virtual_pipeline_model_parallel_size = parallel.virtual_pipeline
    config.pipeline_dtype = params_dtype
    # Stages send tensors of different shapes ([s_vit, b, w_vit] vs [s_dec, b, w_dec]), so
    # the schedules exchange shapes before each tensor.
    config.variable_seq_lengths = True
    # Interleaving is only exact with overlapped, unbatched p2p (batched p2p crosses the sends
    # when both neighbours are one rank: see ../shared/docs/megatron_on_cpu.md).
    interleaved = parallel.virtual_pipeline is not None
    config.overlap_p2p_comm = interleaved
    config.batch_p2p_comm = not interleaved
    # Interleaving runs micro-batches in groups of PP per virtual stage (megatron's default).
    config.microbatch_group_size_per_vp_stage = parallel.pipeline
    # Loss = sum over caption tokens / tokens in the global batch, whatever the micro-batching.
    config.calculate_per_token_loss = True
    return config
