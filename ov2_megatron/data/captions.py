"""Where a sample's caption lives: its `.txt` entry, or a field of its `.json` entry.

img2dataset writes `KEY.txt` from its caption column, but re-captioned sets (Recap-DataComp's
`re_caption`, ShareGPT4V-style `meta.caption`, several candidates per image) often carry the
caption only in `KEY.json`. `caption_key` names the field; dots walk into nested objects
(`meta.caption`). When the field holds a list, it is a list of candidates and the caller passes
a uniform draw in [0, 1) to pick one: inside the loader that draw comes from a DALI random op,
so the choice is fresh every epoch, fixed by the seed and restored exactly by a checkpoint.

The loader (sample_filter.py), tools/prepare_shards.py and tools/train_tokenizer.py all read
captions through `caption_candidates`, so `--caption-key` means the same everywhere.
"""

from __future__ import annotations

import json

from ov2_megatron.data.sample_checks import Issue, check_caption


def lookup(obj, caption_key: str):
    """The value at dotted `caption_key` in a parsed JSON object, or None when absent."""
    for part in caption_key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def caption_candidates(txt: bytes, meta: bytes, caption_key: str) -> tuple[Issue, list[bytes]]:
    """(Issue.OK, candidate captions as UTF-8 bytes) or (the issue, []).

    Without `caption_key` the `.txt` bytes are the one candidate (checked later by
    check_caption). With it, the `.json` field: a string, or a list of strings (empty and
    non-string entries are dropped; none left is NO_CAPTION)."""
    if not caption_key:
        return Issue.OK, [bytes(txt)]
    try:
        obj = json.loads(bytes(meta)) if len(meta) else None
    except (ValueError, UnicodeDecodeError):
        return Issue.CAPTION_FIELD_MISSING, []
    issue, found = candidates_in(obj, caption_key)
    return issue, [c.encode("utf-8", "surrogatepass") for c in found]


def candidates_in(obj, caption_key: str) -> tuple[Issue, list[str]]:
    """(issue, candidate strings) of the field `caption_key` of a parsed `.json` object."""
    value = lookup(obj, caption_key)
    if value is None:
        return Issue.CAPTION_FIELD_MISSING, []
    values = value if isinstance(value, list) else [value]
    found = [v for v in values if isinstance(v, str) and v.strip()]
    return (Issue.OK, found) if found else (Issue.NO_CAPTION, [])


def missing_caption_hint(where: str, has_txt: bool, meta, caption_key: str) -> str | None:
    """One line naming `where` (shard and key) and the fix when its caption cannot be found at
    all (the option is wrong for the whole set, not one bad sample); None when it can."""
    fields = sorted(meta) if isinstance(meta, dict) else []
    if caption_key:
        if meta is None:
            return (f"{where} has no .json entry, so --caption-key {caption_key} finds nothing: "
                    "drop --caption-key to read the .txt captions")
        if lookup(meta, caption_key) is None:
            return (f"{where}: its .json has no field {caption_key!r} (fields: {fields}): "
                    "pass --caption-key with the field that holds the caption")
        return None
    if not has_txt and fields:
        return (f"{where} has no .txt caption; its .json has fields {fields}: pass "
                "--caption-key FIELD (data.caption_key in training) naming the caption field")
    return None


def pick_caption(txt: bytes, meta: bytes, caption_key: str,
                 draw: float | None) -> tuple[Issue, str]:
    """(issue, normalised caption text): candidate floor(draw * n), or the first when `draw` is
    None (evaluation: the same caption every pass)."""
    issue, found = caption_candidates(txt, meta, caption_key)
    if issue != Issue.OK:
        return issue, ""
    index = 0 if draw is None else min(int(draw * len(found)), len(found) - 1)
    return check_caption(found[index])


def json_fields(meta: bytes) -> list[str]:
    """Top-level fields of a `.json` entry, for error messages that suggest a caption_key."""
    try:
        obj = json.loads(bytes(meta))
    except (ValueError, UnicodeDecodeError):
        return []
    return sorted(obj) if isinstance(obj, dict) else []


__all__ = ["lookup", "caption_candidates", "candidates_in", "pick_caption", "json_fields",
           "missing_caption_hint"]
