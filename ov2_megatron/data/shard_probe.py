"""What `--dry-run` reads of every shard: the first few samples and the tar's end.

Start-up checks open each shard's first header only (shard_spec.check_shard), so a set whose
captions sit where the config does not look, whose images are all unreadable, or whose
shards were cut by an interrupted download used to pass a dry-run and fail in training. The
probe reads each shard's first `per_shard` samples through the loader's own per-sample check
(SampleFilter.check: image header, caption, lengths) and reports what training would skip,
by reason with an example; it also names cut shards (no end-of-archive blocks: training reads
their complete samples and skips the rest) and index files that no longer describe their
shard (remade on first use).

Cost: one open and ~`per_shard` samples read per shard (about 1 ms each on a local disk);
at the paper's 100k shards a dry-run reads ~100k files once, which is why training itself
does not run it.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass, field

from ov2_megatron.data.captions import missing_caption_hint
from ov2_megatron.data.config import DataConfig, index_path_for
from ov2_megatron.data.sample_checks import Issue
from ov2_megatron.data.sample_filter import SampleFilter
from ov2_megatron.data.shard_index import index_describes, is_cut
from ov2_megatron.data.shards import ShardCutError, iter_members, split_member_name


@dataclass
class ProbeReport:
    shards: int = 0
    read: int = 0
    """Samples read (at most per_shard a shard)."""
    skipped: Counter = field(default_factory=Counter)
    """Issue name -> samples of those read that training would skip."""
    examples: dict[str, str] = field(default_factory=dict)
    """Issue name -> one "shard:key" that has it."""
    cut: list[str] = field(default_factory=list)
    stale_indexes: list[str] = field(default_factory=list)

    def lines(self, what: str) -> list[str]:
        skipped = sum(self.skipped.values())
        head = (f"{what} shards probed: {self.shards}, first samples read: {self.read}, "
                f"training would skip {skipped}")
        if skipped:
            head += " (" + ", ".join(f"{name} {n}, e.g. {self.examples[name]}"
                                     for name, n in self.skipped.most_common()) + ")"
        out = [head]
        if self.cut:
            out.append(f"{what} shards cut (an interrupted download or copy?): "
                       f"{len(self.cut)}, e.g. {', '.join(self.cut[:3])}: training reads "
                       "their complete samples and skips the rest; re-download them")
        if self.stale_indexes:
            out.append(f"{what} index files that no longer match their shard: "
                       f"{len(self.stale_indexes)}, e.g. {self.stale_indexes[0]}: remade on "
                       "first use")
        return out


def probe_shards(shards: list[str], data: DataConfig, per_shard: int = 2) -> ProbeReport:
    """Read each shard's first `per_shard` samples as the loader would judge them. Raises
    ValueError naming the shard and the fix when the first sample's caption cannot be found
    at all (a wrong data.caption_key), as prepare_shards and train_tokenizer do."""
    judge = SampleFilter(tokenizer=None, caption_length=0,
                         max_image_pixels=data.max_image_pixels, caption_key=data.caption_key,
                         sample_candidates=False, max_caption_bytes=data.max_caption_bytes)
    image_exts = tuple(ext.lower() for ext in data.image_extensions)
    report = ProbeReport(shards=len(shards))
    for shard in shards:
        if is_cut(shard):
            report.cut.append(shard)
        index = index_path_for(shard)
        if os.path.isfile(index) and not index_describes(index, shard):
            report.stale_indexes.append(index)
        try:
            for key, members in itertools.islice(iter_members(shard), per_shard):
                image, txt, meta = _entries(members, image_exts)
                if report.read == 0:
                    has_txt = any(name.endswith(".txt") for name, _ in members)
                    _check_caption_option(shard, key, has_txt, meta, data.caption_key)
                issue, _ = judge.check(image, txt, meta, None)
                report.read += 1
                if issue != Issue.OK:
                    report.skipped[issue.metric_name] += 1
                    report.examples.setdefault(issue.metric_name,
                                               f"{os.path.basename(shard)}:{key}")
        except ShardCutError:
            if shard not in report.cut:
                report.cut.append(shard)
    return report


def _entries(members: list[tuple[str, bytes]], image_exts: tuple[str, ...]
             ) -> tuple[bytes, bytes, bytes]:
    """(image, .txt, .json) bytes of one sample's members, b"" where absent; the image is the
    first of image_exts present, in any letter case (the loader's rule)."""
    by_ext = {split_member_name(name)[1]: data for name, data in members}
    lower = {ext.lower(): data for ext, data in reversed(list(by_ext.items()))}
    image = next((lower[ext] for ext in image_exts if ext in lower), b"")
    return image, by_ext.get("txt", b""), by_ext.get("json", b"")


def _check_caption_option(shard: str, key: str, has_txt: bool, meta_bytes: bytes,
                          caption_key: str) -> None:
    try:
        meta = json.loads(meta_bytes) if meta_bytes else None
    except ValueError:
        meta = None
    hint = missing_caption_hint(f"shard {shard} sample {key}", has_txt, meta, caption_key)
    if hint:
        raise ValueError(hint)


__all__ = ["ProbeReport", "probe_shards"]
