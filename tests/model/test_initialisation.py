"""The official recipe's parameter kinds, held to what the official OpenVision 2 code computed
(tests/fixtures/openvision2_official_trajectory: its params0.npz is the official
initialisation at the fixture's geometry, its meta.json the official weight-decay mask):

- a model built with defaults (model.init 'official') draws every tensor with the official
  std, per tensor, and within the official bounds where the initialiser has one (the
  kaiming-uniform patch embedding, the truncated ViT fc2);
- the decay mask (models/parameter_kinds.decays) is exactly the official list, and megatron's
  optimizer applies weight decay to exactly those tensors.
"""

import json
import math
import os

import numpy as np
import pytest

from tests.harness import run_distributed

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures",
                       "openvision2_official_trajectory")


def _official_params0() -> dict:
    from ov2_megatron.conversion.official_format import standard_from_flax

    with np.load(os.path.join(FIXTURE, "params0.npz")) as data:
        return standard_from_flax({name: data[name] for name in data.files})


def _fixture_model():
    from ov2_megatron.conversion.official_case import model_config

    with open(os.path.join(FIXTURE, "meta.json")) as f:
        return model_config(json.load(f))


def fresh_standard_state(seed: int) -> dict:
    """A model built with defaults at the fixture's geometry, as standard tensors."""
    from ov2_megatron.config import ParallelConfig, validate_model
    from ov2_megatron.models.openvision2 import build_chunks
    from ov2_megatron.models.state_dict_adapter import to_standard
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize

    model = _fixture_model()
    assert model.init == "official"  # the default
    initialize(ParallelLayout(), seed=seed)
    geom = validate_model(model, ParallelConfig())
    (chunk,) = build_chunks(model, ParallelConfig(), geom, init_seed=seed)
    full = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    return to_standard(full, chunk.plan, model.vision.shape()[0].num_heads,
                       model.decoder.shape().num_heads, model.decoder.vocab_size)


def _std(tensor) -> float:
    return float(np.asarray(tensor, dtype=np.float64).std())


def test_fresh_weights_have_the_official_std_per_tensor():
    official = _official_params0()
    ours = run_distributed(fresh_standard_state, 1, args=(3,))[0]
    assert ours.keys() == official.keys()
    for name, want in official.items():
        got = ours[name]
        assert got.shape == want.shape, name
        if _std(want) < 1e-5:  # zeros, ones and the CLS token's N(0, 1e-6)
            assert float(np.abs(got.numpy() - want.numpy().mean()).max()) < 1e-5, name
            continue
        # ~4k-16k draws per tensor: the sample std is within a few % of the std drawn from.
        assert _std(got) == pytest.approx(_std(want), rel=0.06), name
        bound = float(want.abs().max())
        if name == "vision.patch_embed.weight" or name.endswith("vision.blocks.0.mlp.fc2.weight"):
            # bounded initialisers: both reach close to the same hard bound and never past it
            assert float(got.abs().max()) <= bound * 1.001, name
            assert float(got.abs().max()) >= bound * 0.98, name


def test_the_official_bounds_are_the_formulas():
    """The two bounded initialisers at the fixture's geometry: kaiming-uniform with fan-in
    8*8*3 and the truncated normal of std sqrt(0.3072 / 64) (flax's variance_scaling)."""
    from ov2_megatron.models.parameter_kinds import official_init

    official = _official_params0()
    patch = official_init("vision.patch_embed.weight", (64, 3, 8, 8), 64, 64)
    fc2 = official_init("vision.blocks.1.mlp.fc2.weight", (64, 128), 64, 64)
    assert patch.bound == pytest.approx(math.sqrt(6 / 192))
    assert float(official["vision.patch_embed.weight"].abs().max()) <= patch.bound
    assert float(official["vision.blocks.1.mlp.fc2.weight"].abs().max()) <= fc2.bound
    assert float(official["vision.blocks.1.mlp.fc2.weight"].abs().max()) >= 0.99 * fc2.bound


def test_the_decay_mask_is_the_official_one():
    from ov2_megatron.conversion.official_format import standard_from_flax
    from ov2_megatron.models.parameter_kinds import decays

    with open(os.path.join(FIXTURE, "meta.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(FIXTURE, "params0.npz")) as data:
        # 1 where the official optimizer decays, 0 where not, carried through the conversion
        marks = {name: np.full(data[name].shape, float(name in meta["weight_decayed"]))
                 for name in data.files}
    assert set(marks) == set(meta["weight_decayed"]) | set(meta["not_weight_decayed"])
    every = standard_from_flax(marks)
    for name, mark in every.items():
        assert float(mark.min()) == float(mark.max()), name  # one verdict per tensor
    decayed = {name for name, mark in every.items() if float(mark.max()) == 1.0}
    assert "decoder.tok_embed.weight" in every and "decoder.tok_embed.weight" not in decayed
    assert {name for name in every if decays(name)} == decayed


def optimizer_weight_decay() -> dict:
    """{standard name: weight decay of its param group} in megatron's built optimizer."""
    from megatron.core.utils import unwrap_model

    from ov2_megatron.config import ParallelConfig
    from ov2_megatron.models.state_dict_adapter import standard_name
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.training.loop import build_model_and_optimizer
    from ov2_megatron.training.run_config import RunConfig, TrainConfig, validate_run

    run = RunConfig(model=_fixture_model(), parallel=ParallelConfig(),
                    train=TrainConfig(global_batch=8, micro_batch=4, precision="fp32"))
    run.data.resolution = run.model.vision.image_size
    run.data.caption_length = run.model.decoder.caption_length
    initialize(ParallelLayout(), seed=0)
    model, optimizer, scheduler = build_model_and_optimizer(run, validate_run(run, 1))
    scheduler.step(increment=1)  # the scheduler writes each group's weight decay
    chunk = unwrap_model(model[0])
    names = {id(p): standard_name(n, chunk.plan) for n, p in chunk.named_parameters()}
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        # fp32: each torch param group's model parameters, group for group
        for model_group, group in zip(opt.model_fp32_groups, opt.optimizer.param_groups):
            for param in model_group:
                out[names[id(param)]] = group["weight_decay"]
    return out


def test_megatron_decays_exactly_the_official_mask():
    from ov2_megatron.models.parameter_kinds import decays

    decay = run_distributed(optimizer_weight_decay, 1)[0]
    frozen = {"vision.norm.weight", "vision.norm.bias"}  # the pooled feature's, no gradient
    assert set(decay) == set(_official_params0()) - frozen
    for name, value in decay.items():
        assert value == (0.2 if decays(name) else 0.0), name
