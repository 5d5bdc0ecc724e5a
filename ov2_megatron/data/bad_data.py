"""Bad data is loud and bounded: per-window accounting of replaced samples.

The loader replaces a bad sample by a good one of its batch, and skips a batch that has none.
Silently, that turns a wrong shard set (PNG shards read as JPEG, captions only in `.json`)
into a run that prints its start line and then nothing, forever. So every consumed batch goes
through `BadDataMonitor.update`, which
  * warns, naming the reasons and the shards, when more than `warn_fraction` of a window of
    `window` samples was bad;
  * raises `BadDataError`, naming the shards, reasons and the likely fix, once `window`
    samples in a row were bad: bounded, seconds of reading, never a hang.
Between batches the loader is back in Python, so the trainer's signal handlers run there too.
"""

from __future__ import annotations

import warnings
from collections import Counter

from ov2_megatron.data.sample_checks import Issue

# What a user changes when nearly all samples fail for one reason.
_FIXES = {
    Issue.NO_CAPTION: "if the captions are in KEY.json, set data.caption_key to their field "
                      "(e.g. re_caption or meta.caption)",
    Issue.CAPTION_FIELD_MISSING: "data.caption_key names a field the .json entries lack: "
                                 "check its spelling (dots walk into nested objects)",
    Issue.EMPTY_IMAGE: "no entry with one of data.image_extensions: add the shards' image "
                       "extension to data.image_extensions",
    Issue.UNSUPPORTED_IMAGE: "images must be JPEG, PNG or WebP: re-encode with "
                             "tools/prepare_shards.py --input SHARDS",
    Issue.UNDECODABLE: "the decoder rejects these images: re-encode with "
                       "tools/prepare_shards.py --input SHARDS",
    Issue.CORRUPT_SCAN: "the JPEG scan data is broken: re-encode the sources with "
                        "tools/prepare_shards.py --input SHARDS (it drops such images)",
    Issue.CAPTION_TOO_LONG: "captions exceed data.max_caption_bytes: raise it if they are real "
                            "captions, or fix the caption field (data.caption_key)",
}


class BadDataError(RuntimeError):
    """A whole window of samples was bad: the shard set, not a few samples, is wrong."""


class BadDataMonitor:
    def __init__(self, window: int, warn_fraction: float):
        self.window, self.warn_fraction = window, warn_fraction
        self.bad_in_a_row = 0
        self._reset_window()

    def _reset_window(self) -> None:
        self.seen = 0
        self.reasons: Counter = Counter()
        self.shards: Counter = Counter()

    def update(self, issues: list[int], sources: list[str]) -> None:
        """Account one consumed batch: `issues` per row, `sources` ("shard:offset:name" or "")
        per row. Raises BadDataError when `window` samples in a row were bad."""
        for issue, source in zip(issues, sources, strict=True):
            if issue == Issue.OK:
                self.bad_in_a_row = 0
                continue
            self.bad_in_a_row += 1
            self.reasons[Issue(issue)] += 1
            self.shards[shard_of(source)] += 1
        self.seen += len(issues)
        if self.bad_in_a_row >= self.window:
            raise BadDataError(self._message(f"all of the last {self.bad_in_a_row} samples "
                                             "were bad", fix=True))
        if self.seen >= self.window:
            bad = sum(self.reasons.values())
            if bad > self.warn_fraction * self.seen:
                warnings.warn(self._message(f"{bad} of the last {self.seen} samples were bad "
                                            f"(> data.bad_sample_warn_fraction="
                                            f"{self.warn_fraction})", fix=False), stacklevel=3)
            self._reset_window()

    def _message(self, what: str, fix: bool) -> str:
        reasons = ", ".join(f"{issue.metric_name} {n}" for issue, n in self.reasons.most_common())
        shards = ", ".join(f"{name} ({n})" for name, n in self.shards.most_common(5))
        more = len(self.shards) - 5
        shards += f" and {more} more" if more > 0 else ""
        text = f"data loader: {what}; reasons: {reasons}; shards: {shards}"
        top = self.reasons.most_common(1)[0][0] if self.reasons else None
        if fix and top in _FIXES:
            text += f". Fix: {_FIXES[top]}"
        return text


def shard_of(source: str) -> str:
    """The shard path in a DALI source_info "path/shard.tar:offset:name"."""
    path = source.split(".tar:", 1)[0] + ".tar" if ".tar:" in source else source
    return path or "<unknown shard>"


__all__ = ["BadDataMonitor", "BadDataError", "shard_of"]
