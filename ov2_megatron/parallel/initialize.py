"""Process groups: torch.distributed + megatron parallel_state, on GPUs (NCCL) or CPU (gloo).

One entry point for every launcher (torchrun, Slurm srun, the test harness): it reads the
standard rank variables, picks the backend, enables the CPU compatibility layer when there is
no CUDA, builds megatron's TP/PP/DP groups and seeds megatron's RNG tracker.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """The model-parallel shape of a job; data parallelism is what remains of the world."""

    tensor: int = 1
    """Tensor-parallel size (splits heads, MLP and vocabulary)."""
    pipeline: int = 1
    """Pipeline-parallel size (splits layers into stages)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule (None: plain 1F1B)."""

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor ({self.tensor}) x pipeline "
                f"({self.pipeline}) = {model_parallel}: change the layout or the number of ranks"
            )
        return world_size // model_parallel


def _rank_from_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or Slurm variables; (0, 1, 0) if neither."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def local_world_size(world_size: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, Slurm's SLURM_NTASKS_PER_NODE ("8" or
    "8(x2)"), else the whole world (one node)."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "")
    digits = re.match(r"\d+", value)
    return int(digits.group()) if digits else world_size


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_device() -> torch.device:
    """This rank's compute device: its GPU (set by initialize) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(layout: ParallelLayout, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed (if needed) and megatron's parallel state for `layout`."""
    from megatron.core import parallel_state, tensor_parallel

    rank, world_size, local_rank = _rank_from_environment()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        from ov2_megatron import cpu_allocator, cpu_backend

        cpu_backend.enable()
        cpu_allocator.reuse_freed_memory()
    else:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())  # a lone process: any free port
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    layout.data_parallel_size(dist.get_world_size())  # validates divisibility
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        distributed_timeout_minutes=timeout_minutes,
    )
    # The CPU generator initialises replicated parameters (identical on every rank, since
    # megatron DDP does not broadcast); megatron's tracker seeds the TP-sharded ones.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
