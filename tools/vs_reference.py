"""`tools/bench.py --vs-reference`: the megatron model's real training step
(loop.build_model_and_optimizer + loop.train_step: DDP buffers, distributed optimizer,
pipeline schedule) against the independent pure-PyTorch twin of tests/reference with the same
weights (state_dict_adapter), on the same batches and kept-token indices, CPU, TP = 1. Their
first losses must agree (the same model); steps alternate A, B, A, B.

A tool, not the library: it imports the test tree's twin, which ov2_megatron must not.
"""

from __future__ import annotations

import statistics
import time

import torch

from ov2_megatron.config import ModelConfig, ParallelConfig
from ov2_megatron.perf.comm_timing import BlockedTimer
from ov2_megatron.perf.side_by_side import _alternate, _batch

def _reference_twin(model: ModelConfig, geom):
    from tests.reference.openvision2_reference import (DecoderConfig as RefDecoder,
                                                       OpenVision2Reference,
                                                       VisionConfig as RefVision)

    vit, patch = model.vision.shape()
    dec = model.decoder.shape()
    v, d = model.vision, model.decoder
    return OpenVision2Reference(
        RefVision(image_size=v.image_size, patch_size=patch, width=vit.width, depth=vit.depth,
                  mlp_dim=vit.mlp_dim, num_heads=vit.num_heads, in_channels=v.in_channels,
                  class_token=v.class_token, num_registers=geom.num_registers,
                  pos_embed=v.pos_embed, layernorm_eps=model.layernorm_eps),
        RefDecoder(dec_width=dec.width, dec_depth=dec.depth, dec_mlp_dim=dec.mlp_dim,
                   dec_num_heads=dec.num_heads, vocab_size=d.vocab_size, pad_id=d.pad_id,
                   mask=d.mask, loss_weight=d.loss_weight, dec_pos_embed=d.pos_embed,
                   max_text_len=d.caption_length, layernorm_eps=model.layernorm_eps))


def _copy_weights(chunk, reference, model: ModelConfig) -> None:
    from ov2_megatron.models import state_dict_adapter

    vit, _ = model.vision.shape()
    full = {n: p.detach() for n, p in chunk.named_parameters()}
    standard = state_dict_adapter.to_standard(full, chunk.plan, vit.num_heads,
                                              model.decoder.shape().num_heads,
                                              model.decoder.vocab_size)
    state = reference.state_dict()
    for name, value in standard.items():
        state[name] = value if name != "decoder.pos_embed" else \
            torch.cat([value, state[name][value.shape[0]:]])
    reference.load_state_dict(state)


def _reference_optimizer(reference, train):
    """AdamW as configured for megatron: decay on the official mask (the twin's parameter
    names are the standard ones)."""
    from ov2_megatron.models.parameter_kinds import decays
    from ov2_megatron.training.run_config import peak_lr

    decay, plain = [], []
    for name, param in reference.named_parameters():
        (decay if decays(name) else plain).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": plain, "weight_decay": 0.0}], lr=peak_lr(train),
                             betas=(train.beta1, train.beta2), eps=train.eps, foreach=False)


def _recording(fn, sink: list):
    """`fn`, appending the seconds of each call to `sink`."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        sink.append(time.perf_counter() - start)
        return result
    return wrapper


def megatron_vs_reference(run, rounds: int = 5) -> dict:
    """In a single-rank world: megatron train_step vs the twin's step, alternating. Only the
    first losses are comparable (megatron's LR schedule warms up, the twin's AdamW does not)."""
    from ov2_megatron.parallel.initialize import ParallelLayout, initialize
    from ov2_megatron.training.loop import build_model_and_optimizer, train_step
    from ov2_megatron.training.run_config import validate_run
    from ov2_megatron.training.step import MicroBatch

    if torch.cuda.is_available():
        raise ValueError("--vs-reference is a CPU comparison (the twin has no GPU kernels)")
    if run.parallel != ParallelConfig() or run.train.global_batch != run.train.micro_batch:
        raise ValueError("--vs-reference compares one rank at TP = PP = 1 and one micro-batch "
                         "per step (train.global_batch = train.micro_batch)")
    geom = validate_run(run, 1)
    initialize(ParallelLayout(), seed=run.train.seed)
    model, optimizer, scheduler = build_model_and_optimizer(run, geom, "local")
    reference = _reference_twin(run.model, geom)
    _copy_weights(model[0].module, reference, run.model)
    ref_optimizer = _reference_optimizer(reference, run.train)
    b = run.train.micro_batch
    batches = [_batch(run.model, geom, b, seed) for seed in range(rounds + 1)]
    losses = {"megatron": [], "reference": []}
    split = {"megatron_optimizer": [], "megatron_collectives": [], "reference_optimizer": []}
    optimizer.step = _recording(optimizer.step, split["megatron_optimizer"])
    reference_optimizer_step = _recording(ref_optimizer.step, split["reference_optimizer"])
    blocked = BlockedTimer()

    def megatron_step(i):
        before = blocked.total()
        with blocked.active():
            loss, _, _ = train_step(model, optimizer, scheduler, [MicroBatch(*batches[i])],
                                    geom, b)
        split["megatron_collectives"].append(blocked.total() - before)
        losses["megatron"].append(loss)  # train_step reports the unweighted caption loss

    def reference_step(i):
        ref_optimizer.zero_grad(set_to_none=True)
        out = reference(*batches[i])
        out["loss"].backward()
        if run.train.clip_grad:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), run.train.clip_grad)
        reference_optimizer_step()
        losses["reference"].append(float(out["caption_loss"]))

    times = _alternate({"megatron": megatron_step, "reference": reference_step}, rounds)
    median = {k: statistics.median(v) for k, v in times.items()}
    part = {k: statistics.median(v[1:]) for k, v in split.items()}  # [0]: the warm-up round
    return dict(
        megatron_s=median["megatron"], reference_s=median["reference"],
        ratio=median["megatron"] / median["reference"], times_s=times,
        split_s=dict(megatron=dict(optimizer=part["megatron_optimizer"],
                                   collectives=part["megatron_collectives"],
                                   forward_backward=median["megatron"]
                                   - part["megatron_optimizer"]),
                     reference=dict(optimizer=part["reference_optimizer"],
                                    forward_backward=median["reference"]
                                    - part["reference_optimizer"])),
        first_loss=dict(megatron=losses["megatron"][0], reference=losses["reference"][0]),
        parameters=sum(p.numel() for p in reference.parameters()),
        threads=torch.get_num_threads())
