"""Checkpoint files read without running code from them.

A checkpoint is a file users send each other, and a pickle can call anything while it is
read. Every file a load opens is read one of two ways:
- torch files (`rank_*.pt`, dist_checkpointing's `common.pt`, the tensors inside `*.distcp`)
  with `torch.load(weights_only=True)`: tensors, plain containers, numbers and strings only;
- torch.distributed.checkpoint's `.metadata`, which torch itself reads with a bare
  `pickle.load`, first with `check_metadata`: an unpickler that builds only the classes that
  metadata is made of (listed below, the same on megatron-core 0.16 and 0.19 with torch
  2.13), and refuses any other global naming the file and the global, before megatron or torch
  touch it.
"""

from __future__ import annotations

import os
import pickle

import torch

METADATA = ".metadata"

# (module, name) pairs that torch.distributed.checkpoint's Metadata pickles to. Each is a plain
# dataclass, an enum, torch.Size, a dtype, or torch.serialization._get_layout (which maps a
# layout's name to the layout): building any of them runs no user code.
_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors and plain data."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to load {module}.{name}: torch checkpoint metadata holds no "
            "such object, so this file was not written by a checkpoint save (or was altered "
            "since); nothing from it was run. Use a checkpoint from a source you trust")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.path}: persistent ids are not checkpoint metadata")


def check_metadata(step_dir: str) -> None:
    """Unpickle `step_dir/.metadata` with the allow-list; raises naming the file if it holds
    anything else or cannot be read. A step dir without `.metadata` passes (nothing to read)."""
    path = os.path.join(step_dir, METADATA)
    if not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as error:
        raise UnsafeCheckpointError(f"{path}: not readable checkpoint metadata "
                                    f"({type(error).__name__}: {error})") from None


# numpy's pickled arrays, for per-rank files written before the RNG state was saved as a
# tensor: torch's documented allow-list for numpy arrays (they rebuild an array, nothing more).
def _numpy_array_globals() -> list:
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    out = [multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out.append(dtypes.UInt32DType)
    return out + [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                  (multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]


def load_torch_file(path: str):
    """`torch.load(path, weights_only=True)`; a refusal names the file."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message starts with advice to load it unsafely; keep only what it found.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        found = next((line for line in lines if "WeightsUnpickler error" in line),
                     lines[0] if lines else type(error).__name__)
        raise UnsafeCheckpointError(f"{path}: refusing to load: it holds more than tensors and "
                                    f"plain data ({found}); nothing from it was run") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UnsafeCheckpointError(f"{path}: not a readable checkpoint file "
                                    f"({type(error).__name__}: {error})") from None
