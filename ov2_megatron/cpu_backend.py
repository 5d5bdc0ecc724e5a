"""megatron-core on CPU with gloo: the compatibility layer.

megatron-core hard-codes the CUDA device in many places (buffers, p2p, RNG tracker, optimizer
asserts); none of them needs a GPU for its algorithm. `enable()` makes the real megatron code
paths (TP, SP, PP incl. interleaved, DDP, distributed optimizer, dist_checkpointing) run on
CPU, so a parallel layout can be debugged on a laptop and tested in CI. It is applied by
`ov2_megatron.parallel.initialize` when CUDA is absent and refuses to run when CUDA exists:
on a GPU every patch below would silently move work to the CPU.

What it does, process-wide and once:
1. torch's factory functions and tensor moves map CUDA device requests (`device="cuda"`,
   `device=0`, `.to("cuda")`, `.cuda()`) to the CPU, and `Tensor.type()` answers megatron's
   `p.type()` asserts with the `torch.cuda.*` spelling (only for callers inside megatron);
2. `torch.cuda.{current_device, current_stream, synchronize, get/set_rng_state, manual_seed,
   ...}` answer for the CPU, and megatron's RNG tracker swaps the CPU generator state where it would swap the
   CUDA one (so TP-rank-distinct dropout/init keeps its meaning);
3. megatron's `WrappedTorchNorm` may be built under sequence parallelism, and its parameters
   are tagged `sequence_parallel=True` so their gradients are all-reduced over the TP group,
   which is what the Apex/TE norms do on GPU.

`UPSTREAM_LOCATIONS` names every upstream place the layer covers on each megatron-core line
the test suite proves (0.16.1 on Python 3.11, 0.19.2 on Python 3.12); `check_upstream()` fails
loudly when one of them disappears and refuses a release outside those lines, which must be
re-validated first.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading

import torch

# (dotted upstream symbol, why the layer touches it). Checked by check_upstream().
_COMMON_LOCATIONS: tuple[tuple[str, str], ...] = (
    ("megatron.core.utils.GlobalMemoryBuffer.get_tensor",
     "SP all-gather buffer allocated on torch.cuda.current_device(): device rewrite"),
    ("megatron.core.tensor_parallel.mappings._reduce_scatter_along_first_dim",
     "SP reduce-scatter output on the CUDA device: device rewrite"),
    ("megatron.core.tensor_parallel.mappings._gather_along_first_dim",
     "SP all-gather output on the CUDA device: device rewrite"),
    ("megatron.core.tensor_parallel.random._get_cuda_rng_state",
     "RNG tracker reads the CUDA generator: replaced by the CPU generator"),
    ("megatron.core.tensor_parallel.random._set_cuda_rng_state",
     "RNG tracker writes the CUDA generator through _lazy_call (never runs on CPU): replaced"),
    ("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork",
     "warns 'CPU RNG state changed' when the CPU generator is the tracked one: filtered"),
    ("megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed",
     "torch.cuda.manual_seed/get_rng_state: routed to the CPU generator"),
    ("megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining",
     "total_num_tokens allocated with device='cuda': device rewrite"),
    ("megatron.core.pipeline_parallel.p2p_communication.P2PCommunicator",
     "receive buffers on torch.cuda.current_device() and torch.cuda.synchronize: rewrite/no-op"),
    ("megatron.core.optimizer.clip_grads.get_grad_norm_fp32",
     "norm buffers with device='cuda': device rewrite"),
    ("megatron.core.optimizer.optimizer.MixedPrecisionOptimizer",
     "asserts param.type() == 'torch.cuda.FloatTensor': answered for megatron callers"),
    ("megatron.core.distributed.param_and_grad_buffer._ParamAndGradBuffer",
     "grad buffers on torch.cuda.current_device(): device rewrite"),
    ("megatron.core.transformer.torch_norm.WrappedTorchNorm",
     "asserts not sequence_parallel: built without it, params tagged sequence_parallel"),
)

# What each proven release adds to the common list, by (major, minor) line.
_LINE_LOCATIONS: dict[tuple[int, int], tuple[tuple[str, str], ...]] = {
    (0, 16): (),
    (0, 19): (
        ("megatron.core.distributed.param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync",
         "waits on torch.cuda.current_stream() for CUDA-graph events: the CPU's no-op stream"),
    ),
}


def megatron_line() -> tuple[int, int]:
    import megatron.core

    major, minor = megatron.core.__version__.split(".")[:2]
    return int(major), int(minor)


def upstream_locations() -> tuple[tuple[str, str], ...]:
    """The locations covered on the installed megatron-core line; raises on an unproven line."""
    line = megatron_line()
    if line not in _LINE_LOCATIONS:
        import megatron.core

        proven = ", ".join(f"{major}.{minor}" for major, minor in _LINE_LOCATIONS)
        raise RuntimeError(
            f"ov2_megatron.cpu_backend: megatron-core {megatron.core.__version__} is not a line "
            f"this layer was validated on ({proven}). Install a proven release "
            "(requirements-cpu.txt / requirements-py312.txt) or validate the new one and add "
            "its locations to _LINE_LOCATIONS."
        )
    return _COMMON_LOCATIONS + _LINE_LOCATIONS[line]

_enabled = False
_lock = threading.Lock()
_log = logging.getLogger(__name__)


def is_enabled() -> bool:
    return _enabled


def enable() -> None:
    """Apply the layer to this process (idempotent). Raises on a machine with CUDA."""
    global _enabled
    if torch.cuda.is_available():
        raise RuntimeError(
            "ov2_megatron.cpu_backend.enable() refused: CUDA is available. The CPU backend "
            "rewrites CUDA device requests to the CPU and must never run on a GPU machine; "
            "initialise distributed training normally (it only enables this layer when "
            "torch.cuda.is_available() is False)."
        )
    with _lock:
        if _enabled:
            return
        check_upstream()
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_torch_norm()
        _patch_torch_devices()
        _enabled = True


def check_upstream() -> None:
    """Raise if any upstream symbol this layer covers is missing from megatron-core."""
    missing = [name for name, _ in upstream_locations() if _resolve(name) is None]
    if missing:
        import megatron.core

        raise RuntimeError(
            f"ov2_megatron.cpu_backend: megatron-core {megatron.core.__version__} lacks "
            f"{missing}. Re-check these locations before trusting CPU results on this version."
        )


def _resolve(dotted: str):
    """Import the longest module prefix of `dotted`, then walk attributes; None if absent."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


# --- 1. device rewrite ------------------------------------------------------------------
# Wrappers around torch's factory functions and tensor moves, installed on the torch module
# itself: a TorchFunctionMode would be thread-local and is not active inside autograd's
# backward, where megatron's SP mappings allocate their outputs.

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn",
    "randint", "randperm", "empty_strided", "empty_like", "zeros_like", "ones_like",
    "full_like", "rand_like", "randn_like", "eye", "linspace",
)
_TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int means "CUDA device N" to torch; there is none here.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_device_kwarg(fn):
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper.__name__ = fn.__name__
    return wrapper


def _called_from_megatron() -> bool:
    frame = sys._getframe(2)
    return frame is not None and frame.f_globals.get("__name__", "").startswith("megatron")


def _patch_torch_devices() -> None:
    for name in _FACTORIES:
        setattr(torch, name, _cpu_device_kwarg(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        setattr(torch.Tensor, name, _cpu_device_kwarg(getattr(torch.Tensor, name)))

    original_to, original_type = torch.Tensor.to, torch.Tensor.type

    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu", *args[1:])
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    def tensor_type(self, *args, **kwargs):
        result = original_type(self, *args, **kwargs)
        # megatron asserts `param.type() == 'torch.cuda.FloatTensor'` on optimizer paths.
        if not args and not kwargs and _called_from_megatron():
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    torch.Tensor.to = to
    torch.Tensor.type = tensor_type
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kwargs: self


# --- 2. torch.cuda and the RNG tracker ---------------------------------------------------

def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")  # megatron passes it as `device=`
    # torch's CPU stream: wait_stream/wait_event/record_event exist and do nothing.
    cuda.current_stream = lambda device=None: torch.cpu.current_stream()
    cuda.synchronize = lambda device=None: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator
    # directly, and let manual_seed_all do nothing (the CPU generator is already seeded).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.empty_cache = lambda: None


class _DropCpuRngWarning(logging.Filter):
    """The tracker's forked state *is* the CPU generator here, so this warning is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngWarning())


# --- 3. torch LayerNorm under sequence parallelism ---------------------------------------

def _patch_torch_norm() -> None:
    import copy

    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        # Under SP each TP rank normalises its own sequence shard with replicated weights;
        # their gradients are partial sums that finalize_model_grads all-reduces over the
        # TP group for parameters tagged `sequence_parallel` (as Apex/TE norms are).
        plain = copy.copy(config)  # a shallow copy skips __post_init__ re-validation
        plain.sequence_parallel = False
        norm = original_new(cls, plain, hidden_size, eps, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new
