"""AdamW through megatron's (distributed) optimizer, and the warmup + cosine schedule.

Weight decay follows the official mask (models/parameter_kinds.decays): Dense and Conv
weights only, not norms, biases, CLS/register tokens, position tables nor the caption token
embedding. Decoupled, as optax's add_decayed_weights before scale_by_learning_rate:
p -= lr * (adam_update + weight_decay * p), which is torch AdamW's step.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model

from ov2_megatron.models.parameter_kinds import decays
from ov2_megatron.models.state_dict_adapter import standard_name
from ov2_megatron.training.run_config import TrainConfig, effective_warmup, peak_lr, total_steps


def undecayed_parameters(model_chunks: list) -> set[int]:
    """ids of the parameters the official mask leaves undecayed (by their standard names,
    which depend on each chunk's pipeline plan: megatron's own names do not say the layer)."""
    return {id(param) for chunk in model_chunks
            for name, param in unwrap_model(chunk).named_parameters()
            if not decays(standard_name(name, unwrap_model(chunk).plan))}


def build_optimizer(model_chunks: list, train: TrainConfig):
    lr, steps = peak_lr(train), total_steps(train)
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.beta1, adam_beta2=train.beta2, adam_eps=train.eps,
        clip_grad=train.clip_grad, bf16=train.precision == "bf16",
        params_dtype=torch.bfloat16 if train.precision == "bf16" else torch.float32,
        use_distributed_optimizer=True)
    undecayed = undecayed_parameters(model_chunks)
    # Given overrides, megatron applies only these (not its own bias / 1-D rule).
    no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="ov2_official_decay_mask", fn=lambda param, name: id(param) in undecayed))
    optimizer = get_megatron_optimizer(config, model_chunks,
                                       config_overrides={no_decay: {"wd_mult": 0.0}})
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=train.min_lr,
        lr_warmup_steps=effective_warmup(train), lr_decay_steps=steps,
        lr_decay_style="cosine", start_wd=train.weight_decay, end_wd=train.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant")
    return optimizer, scheduler


def inner_optimizers(optimizer) -> list:
    """The per-dtype megatron optimizers inside a ChainedOptimizer (or the one given)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_params(opt) -> list[torch.Tensor]:
    """The fp32 master shards one megatron optimizer's torch optimizer updates, in its order
    (views of the weights in fp32): what its state_dict's integer keys index."""
    return [p for group in opt.optimizer.param_groups for p in group["params"]]
