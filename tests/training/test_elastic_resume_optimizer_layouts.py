"""Resume on another data-parallel size with either optimizer-state layout megatron builds:
torch's AdamW (per-parameter `step`; what runs here) and Transformer Engine's / Apex's
FusedAdam (one `step` per param group; what NGC containers run). Neither TE nor Apex runs on
CPU, so FusedAdamLayout below stands in for them, and megatron builds it where it would build
FusedAdam.

A run trains 4 steps at one DP size, saving at step 2; the step-2 checkpoint resumes in a
fresh directory at another DP size. The resumed optimizer, right after its restore, holds
bitwise the straight run's step-2 state (every element's fp32 master, exp_avg and exp_avg_sq,
and every parameter's step, gathered over the ranks of each run), and the losses of steps 3
and 4 match the straight run's to reduction-order rounding (1e-5): step 3's is computed on the
loaded weights, step 4's on those moved by the resharded state.

Single-process tests cover what these runs cannot reach: a per-parameter tensor other than the
moments (TE's master_param) cut in its own dtype, the refusals of state that cannot be
resharded exactly, param-group entries voted only by the old ranks whose group held
parameters, and the rank-file check reading the per-group layout.
"""

import os

import pytest
import torch

from tests.harness import run_distributed
from tests.training.test_elastic_resume import SAVED, STEPS, _resume_elsewhere
from tests.training.test_resume import losses, tiny

# One run (set-up, 4 steps, a save or a restore) took 4-12 s on 2 cores shared with other
# test runs; two runs per test stay inside pytest.ini's 300 s per test.
RUN_TIMEOUT_S = 120


class FusedAdamLayout(torch.optim.Optimizer):
    """Adam(W) on CPU with the state layout and step semantics of TE's FusedAdam
    (transformer_engine/pytorch/optimizers/fused_adam.py, as released up to 2.18; Apex's
    apex/optimizers/fused_adam.py keeps the same):
    - one int `step` per param group, set to 1 or advanced by 1 at each step(), only in groups
      with parameters (both skip empty groups before counting);
    - per parameter only `exp_avg` and `exp_avg_sq`, fp32 zeros at the first step;
    - torch's state_dict / load_state_dict (TE's overrides only unscale and rescale moments
      kept in fp16/fp8, which megatron asks for only with its precision-aware optimizer).
    The arithmetic is torch.optim.AdamW's single-tensor path, op for op, so its steps equal
    AdamW's bitwise (test_fused_adam_layout_steps_as_torch_adamw); TE's kernel computes the
    same update up to rounding."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, bias_correction=True, adam_w_mode=True, capturable=False,
                 master_weights=False):
        # megatron passes params, lr, weight_decay, betas, eps, adam_w_mode, and from 0.17 on
        # capturable (False unless optimizer_cuda_graph); master_weights and the moment dtypes
        # only with its precision-aware optimizer, which needs TE itself.
        if amsgrad or capturable or master_weights:
            raise NotImplementedError("FusedAdamLayout covers FusedAdam without AMSGrad, CUDA "
                                      "graphs or optimizer-held master weights")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas,
                                      eps=eps, weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            lr, step, weight_decay = group["lr"], group["step"], group["weight_decay"]
            correction1 = 1 - beta1 ** step if group["bias_correction"] else 1.0
            correction2 = 1 - beta2 ** step if group["bias_correction"] else 1.0
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                grad = param.grad
                if weight_decay != 0:
                    if self.adam_w_mode:
                        param.mul_(1 - lr * weight_decay)
                    else:
                        grad = grad.add(param, alpha=weight_decay)
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / correction2 ** 0.5).add_(group["eps"])
                param.addcdiv_(state["exp_avg"], denom, value=-lr / correction1)
        return loss


def build_fused_adam_layout() -> None:
    """Make megatron build FusedAdamLayout wherever it would build TE's FusedAdam: the names
    megatron.core.optimizer binds at import when TE imports (`Adam`, and
    USING_PYTORCH_OPTIMIZER=False, which adds adam_w_mode to its arguments), and
    distrib_optimizer's flags for a TE optimizer. Call in the rank, before loop.setup."""
    import megatron.core.optimizer as megatron_optimizer
    from megatron.core.optimizer import distrib_optimizer

    megatron_optimizer.Adam = FusedAdamLayout
    megatron_optimizer.USING_PYTORCH_OPTIMIZER = False
    distrib_optimizer.Adam = FusedAdamLayout
    distrib_optimizer.HAVE_APEX_OR_TE = True
    distrib_optimizer.USING_TE_OPTIMIZER = True


def optimizer_pieces(optimizer, layout: str) -> dict:
    """{parameter name: [(start, end, {"master", "exp_avg", "exp_avg_sq": tensor}, step)]} of
    this rank's optimizer in memory (built in `layout`), the step read from where it is kept."""
    from ov2_megatron.training import elastic_resume
    from ov2_megatron.training.optimizer import inner_optimizers, main_params

    built = {"fused": FusedAdamLayout, "torch": torch.optim.AdamW}[layout]
    pieces = {}
    for opt in inner_optimizers(optimizer):
        assert type(opt.optimizer) is built, opt.optimizer
        groups = [group for group in opt.optimizer.param_groups for _ in group["params"]]
        for master, group, (name, start, end) in zip(main_params(opt), groups,
                                                     elastic_resume.param_index(opt)):
            state = opt.optimizer.state[master]
            step = state["step"] if "step" in state else group["step"]
            tensors = {key: value.clone() for key, value in state.items() if key != "step"}
            pieces.setdefault(name, []).append(
                (start, end, dict(tensors, master=master.detach().clone()), float(step)))
    return pieces


def train_recording(output_dir: str, layout: str) -> dict:
    """loop.train to step STEPS, saving at SAVED; returns this rank's optimizer pieces
    right after its checkpoint save (a straight run) or its restore (a resumed one)."""
    from ov2_megatron.training import checkpoint, loop

    if layout == "fused":
        build_fused_adam_layout()
    recorded = {}
    save, restore = checkpoint.save, loop._restore

    def recording_save(root, step, chunks, optimizer, *args):
        path = save(root, step, chunks, optimizer, *args)
        if step == SAVED:
            recorded.update(optimizer_pieces(optimizer, layout))
        return path

    def recording_restore(run, model, optimizer, *args):
        result = restore(run, model, optimizer, *args)
        if result[0] == SAVED:
            recorded.update(optimizer_pieces(optimizer, layout))
        return result

    checkpoint.save, loop._restore = recording_save, recording_restore
    extra = [f"train.steps={STEPS}", f"train.save_interval={SAVED}", "train.keep_last=5"]
    loop.train(tiny(output_dir, extra))
    return recorded


def whole_state(per_rank: list[dict]) -> dict:
    """{(parameter name, key): every element, in order} and {(name, "step"): step}, put
    together from all ranks' pieces; each element must come from exactly one piece."""
    pieces = {}
    for rank_pieces in per_rank:
        for name, held in rank_pieces.items():
            pieces.setdefault(name, []).extend(held)
    whole = {}
    for name, held in pieces.items():
        held.sort(key=lambda piece: piece[0])
        assert [piece[0] for piece in held[1:]] == [piece[1] for piece in held[:-1]], name
        assert held[0][0] == 0 and len({piece[3] for piece in held}) == 1, name
        whole[(name, "step")] = held[0][3]
        for key in held[0][2]:
            whole[(name, key)] = torch.cat([piece[2][key].reshape(-1) for piece in held])
    return whole


@pytest.fixture(scope="module", autouse=True)
def dataset_cache(tmp_path_factory):
    os.environ["OV2_CACHE"] = str(tmp_path_factory.mktemp("ov2cache"))
    yield


@pytest.mark.parametrize("layout", ["torch", "fused"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resharded_optimizer_state_equals_the_straight_runs(tmp_path, layout, before, after):
    straight = str(tmp_path / "straight")
    want = whole_state(run_distributed(train_recording, before, args=(straight, layout),
                                       timeout=RUN_TIMEOUT_S))
    resumed = _resume_elsewhere(straight, tmp_path)
    got = whole_state(run_distributed(train_recording, after, args=(resumed, layout),
                                      timeout=RUN_TIMEOUT_S))

    assert sorted(got) == sorted(want)
    assert {key for _, key in want} == {"step", "master", "exp_avg", "exp_avg_sq"}
    for key in want:
        if key[1] == "step":
            assert got[key] == want[key] == SAVED, key
        else:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    want_loss, got_loss = losses(straight), losses(resumed)
    for step in range(SAVED + 1, STEPS + 1):
        assert got_loss[step] == pytest.approx(want_loss[step], rel=1e-5, abs=0), step


def test_fused_adam_layout_steps_as_torch_adamw():
    """The stand-in is Adam(W): bitwise torch's AdamW over steps, with and without decay,
    with an empty param group (which it, like FusedAdam, never counts)."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(4)]
    copies = [[p.clone().requires_grad_() for p in start] for _ in range(2)]

    def grouped(params):
        return [dict(params=[params[0]], weight_decay=0.1),
                dict(params=[params[1]], weight_decay=0.0), dict(params=[])]

    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    fused = FusedAdamLayout(grouped(copies[0]), adam_w_mode=True, **kwargs)
    reference = torch.optim.AdamW(grouped(copies[1]), **kwargs)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in start]
        for params, optimizer in zip(copies, (fused, reference)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for mine, theirs in zip(*copies):
        assert torch.equal(mine, theirs)
    assert [group.get("step") for group in fused.state_dict()["param_groups"]] == [3, 3, None]
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in fused.state_dict()["state"].values())


def _piece(path, start, end, **state):
    from ov2_megatron.training.elastic_resume import _Piece

    return _Piece(path, start, end, 0, torch.arange(start, end, dtype=torch.float32), state)


def _old_pieces(**changes):
    """Parameter "w" (6 elements) as two old ranks held it, in both layouts' kinds of state:
    fp32 moments, TE's int16 master_param remainders (precision-aware, bf16) and a 0-d step."""
    state = {path: dict(exp_avg=torch.arange(start, end, dtype=torch.float32) / 8,
                        master_param=torch.arange(start, end, dtype=torch.int16) * 100,
                        step=torch.tensor(2.0))
             for path, start, end in (("a.pt", 0, 4), ("b.pt", 4, 6))}
    state["b.pt"].update(changes)
    state["b.pt"] = {key: value for key, value in state["b.pt"].items() if value is not None}
    return [_piece("a.pt", 0, 4, **state["a.pt"]), _piece("b.pt", 4, 6, **state["b.pt"])]


def test_per_element_state_is_cut_in_its_own_dtype_and_single_values_carried():
    from ov2_megatron.training.elastic_resume import _assemble

    master, state = _assemble("w", 2, 6, 0, _old_pieces())
    assert torch.equal(master, torch.arange(2.0, 6.0))
    assert torch.equal(state["exp_avg"], torch.arange(2.0, 6.0) / 8)
    assert state["master_param"].dtype == torch.int16
    assert torch.equal(state["master_param"], torch.arange(2, 6, dtype=torch.int16) * 100)
    assert state["step"].dim() == 0 and state["step"].item() == 2.0


@pytest.mark.parametrize("changes, message", ids=[
    "step disagrees", "step missing", "extra key", "wrong size", "other dtype"], argvalues=[
    (dict(step=torch.tensor(3.0)), r"w: optimizer state 'step' is tensor\(3\.\) in b\.pt .*"
                                   r"disagree"),
    (dict(step=None), r"w: optimizer state keys .* in b\.pt"),
    (dict(scale=torch.ones(1)), r"w: optimizer state keys"),
    (dict(exp_avg=torch.ones(3)), r"b\.pt: optimizer state 'exp_avg' of w is \(3,\), neither "
                                  r"one value per element of its 2-element piece"),
    (dict(master_param=torch.ones(2, dtype=torch.int32)),
     r"w: optimizer state 'master_param' is torch\.int32 in b\.pt"),
])
def test_state_that_cannot_be_resharded_exactly_is_refused(changes, message):
    from ov2_megatron.training.elastic_resume import _assemble

    with pytest.raises(ValueError, match=message):
        _assemble("w", 2, 6, 0, _old_pieces(**changes))


def test_param_group_entries_come_from_the_ranks_that_held_the_group():
    """FusedAdam counts no step in a group without parameters: an old rank whose piece held
    none of group 1 has no `step` there, and only the others' vote counts."""
    from ov2_megatron.training.elastic_resume import _carried_groups

    def saved(groups):
        return dict(torch=dict(param_groups=groups))

    a = [dict(params=[0], step=2, lr=0.1), dict(params=[1], step=2, lr=0.1)]
    b = [dict(params=[0], step=2, lr=0.1), dict(params=[], lr=0.1)]
    new = [dict(params=[0, 1], lr=0.0), dict(params=[2], lr=0.0)]
    groups = _carried_groups([("a.pt", saved(a)), ("b.pt", saved(b))], new)
    assert groups == [dict(params=[0, 1], step=2, lr=0.1), dict(params=[2], step=2, lr=0.1)]
    b[0]["step"] = 3
    with pytest.raises(ValueError, match=r"optimizer param group 0 'step' is 2 in a\.pt and 3 "
                                         r"in b\.pt"):
        _carried_groups([("a.pt", saved(a)), ("b.pt", saved(b))], new)


def _fused_adam_state(**group):
    moments = dict(exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))
    return dict(torch=dict(state={0: moments}, param_groups=[dict(params=[0], **group)]),
                main_params=[torch.zeros(3)])


@pytest.mark.parametrize("saved, message", ids=["no step", "no moment", "nan"], argvalues=[
    (_fused_adam_state(), "has no step count for 1 of 1 parameters"),
    (dict(_fused_adam_state(step=2), torch=dict(state={0: dict(exp_avg=torch.zeros(3))},
                                                param_groups=[dict(params=[0], step=2)])),
     "has no moments for 1 of 1 parameters"),
    (dict(_fused_adam_state(step=2), main_params=[torch.tensor([0.0, float("nan"), 0.0])]),
     "master weight 0 .* holds non-finite values"),
])
def test_rank_file_check_reads_the_per_group_layout(saved, message):
    from ov2_megatron.training.checkpoint import _check_optimizer_state

    _check_optimizer_state("rank_00000.pt", 0, _fused_adam_state(step=2), 1)
    with pytest.raises(ValueError, match=message):
        _check_optimizer_state("rank_00000.pt", 0, saved, 1)
