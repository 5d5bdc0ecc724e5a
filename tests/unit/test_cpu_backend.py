"""The CPU compatibility layer: its guard, idempotence, device rewrite, RNG routing, and the
upstream symbols it covers. Process-wide effects are checked in fresh processes."""

import pytest
import torch

from ov2_megatron import cpu_backend
from tests.harness import DistributedFailure, run_distributed


def test_every_covered_upstream_symbol_exists():
    cpu_backend.check_upstream()  # raises, naming the symbols, if one disappeared
    locations = cpu_backend.upstream_locations()
    for name, why in locations:
        assert cpu_backend._resolve(name) is not None, name
        assert why
    # Each proven line carries its own additions (0.19 waits on CUDA streams in DDP).
    stream_wait = "megatron.core.distributed.param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync"
    assert (stream_wait in dict(locations)) == (cpu_backend.megatron_line() >= (0, 19))


def test_missing_upstream_symbol_is_a_loud_error(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_COMMON_LOCATIONS",
                        (("megatron.core.utils.NoSuchBuffer.get_tensor", "x"),))
    with pytest.raises(RuntimeError, match="NoSuchBuffer"):
        cpu_backend.check_upstream()


def test_an_unproven_megatron_line_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_backend, "megatron_line", lambda: (0, 17))
    with pytest.raises(RuntimeError, match=r"not a line this layer was validated on \(0\.16, 0\.19\)"):
        cpu_backend.check_upstream()


def stream_waits():
    cpu_backend.enable()
    stream = torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())
    stream.wait_event(torch.cpu.Event())
    return type(stream).__module__


def test_cuda_stream_waits_are_the_cpu_streams_no_ops():
    assert run_distributed(stream_waits, 1) == ["torch.cpu"]


def refuse_with_cuda():
    torch.cuda.is_available = lambda: True
    cpu_backend.enable()


def test_refuses_where_cuda_is_available():
    with pytest.raises(DistributedFailure, match="refused: CUDA is available"):
        run_distributed(refuse_with_cuda, 1)


def rewrite_and_rng():
    from megatron.core import tensor_parallel

    assert not cpu_backend.is_enabled()
    cpu_backend.enable()
    wrapped_empty = torch.empty
    cpu_backend.enable()  # idempotent: nothing wrapped twice
    assert torch.empty is wrapped_empty and not hasattr(torch.empty.__wrapped__, "__wrapped__")
    devices = [
        torch.zeros(2, device="cuda").device.type,
        torch.empty(2, device=torch.cuda.current_device()).device.type,
        torch.ones(2).to("cuda:0").device.type,
        torch.ones(2).cuda().device.type,
        torch.ones(2).new_zeros(3, device=torch.device("cuda")).device.type,
    ]
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    plain = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork():
        forked = torch.rand(4)
    after_fork = torch.rand(4)
    with tracker.fork():
        forked_again = torch.rand(4)
    return dict(devices=devices, plain=plain, forked=forked, after_fork=after_fork,
                forked_again=forked_again)


def test_device_rewrite_and_rng_tracker_on_cpu():
    result = run_distributed(rewrite_and_rng, 1)[0]
    assert result["devices"] == ["cpu"] * 5
    # The forked model-parallel stream is its own stream ...
    assert not torch.equal(result["forked"], result["plain"])
    # ... and leaving it restores the default stream exactly where it was.
    torch.manual_seed(0)
    torch.testing.assert_close(result["after_fork"], torch.rand(4), rtol=0, atol=0)
    # The tracked stream advances across forks instead of restarting.
    assert not torch.equal(result["forked_again"], result["forked"])
