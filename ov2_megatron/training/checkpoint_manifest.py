"""`manifest.json`: what a complete checkpoint step directory holds, to tell it from a
damaged or incomplete one before anything is loaded from it.

    {"format": "ov2_megatron.checkpoint_manifest/1",
     "files": {"__0_0.distcp": {"size": 5216523, "sha256": "9f2c..."},
               "rank_00000.pt": {...}, "meta.json": {...}, ".metadata": {...}, ...}}

It is written last, by rank 0, into the staging directory (`step_X.partial`) after every rank
finished writing and before the rename that publishes the checkpoint, so a step directory
with a manifest was complete when it was published. `verify` checks every listed file's size
(a stat each), and with `digests=True` its sha256 too (reads every byte, ~1 GB/s per core:
about 2 s per 1 GiB of checkpoint). Files not listed are ignored.

Checkpoints written before the manifest existed verify as `LEGACY`: they load with an
"unverified" warning rather than being refused, because refusing would strand every run
trained so far, and the protection against code in them does not depend on the manifest (see
safe_unpickle.py); only silent damage goes undetected in them.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "manifest.json"
FORMAT = "ov2_megatron.checkpoint_manifest/1"
LEGACY = "legacy"  # verify()'s answer for a step dir written before manifests
_CHUNK = 1 << 22


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write(step_dir: str) -> None:
    """List every file under `step_dir` (sizes and digests) into its manifest."""
    files = {}
    for folder, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, step_dir)
            if rel != MANIFEST:
                files[rel] = dict(size=os.path.getsize(path), sha256=sha256(path))
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(dict(format=FORMAT, files=dict(sorted(files.items()))), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str, digests: bool = True) -> str | None:
    """None if `step_dir` is what its manifest lists, LEGACY if it has no manifest (and looks
    like a pre-manifest checkpoint), else one line saying what is wrong."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isdir(step_dir):
        return f"{step_dir} does not exist"
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(step_dir, "meta.json")):
            return LEGACY
        return f"{step_dir} has neither {MANIFEST} nor meta.json: an incomplete checkpoint"
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        assert manifest.get("format") == FORMAT and isinstance(files, dict)
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        return f"{path} is damaged (not a {FORMAT} manifest)"
    for rel, want in files.items():
        file = os.path.join(step_dir, rel)
        if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
            return f"{path} lists {rel!r}, outside the checkpoint"
        if not os.path.isfile(file):
            return f"{file} is missing"
        size = os.path.getsize(file)
        if size != want["size"]:
            return (f"{file} has {size} bytes, the manifest says {want['size']}: truncated or "
                    "damaged")
    if digests:
        for rel, want in files.items():
            if sha256(os.path.join(step_dir, rel)) != want["sha256"]:
                return (f"{os.path.join(step_dir, rel)} does not match its sha256 in the "
                        "manifest: damaged since it was saved")
    return None
