"""Outputs appear whole or not at all: written under a temporary name beside the target, then
renamed into place (a rename within one directory is atomic), so an interrupted or failed
conversion never leaves a file or directory that looks complete.

mkdtemp / mkstemp create 0700 / 0600 whatever the umask (they are meant for private scratch
space); the staged outputs are chmod'ed to what a plain mkdir / open would give, 0777 / 0666
masked by the umask, so exports are as readable as any other file the user writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from ov2_megatron.conversion import ConversionError


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it: set and restore)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_existing(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(f"output {path} already exists: choose a new path or delete it")


@contextlib.contextmanager
def staged_directory(final: str):
    """Yields a fresh directory next to `final`; renamed to `final` if the block succeeds."""
    final = os.path.abspath(final)
    refuse_existing(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(final) + ".partial-", dir=parent)
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
        if os.path.isdir(final):
            os.rmdir(final)  # an empty directory (refuse_existing allowed it)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(final: str):
    """Yields a temporary path next to `final`; renamed to `final` if the block succeeds."""
    final = os.path.abspath(final)
    if os.path.isdir(final):
        raise ConversionError(f"output {final} is a directory: give a file name")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix="." + os.path.basename(final) + ".partial-",
                                       dir=os.path.dirname(final))
    os.close(handle)
    os.chmod(staging, 0o666 & ~current_umask())
    try:
        yield staging
        os.replace(staging, final)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
