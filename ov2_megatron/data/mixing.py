"""Shard specs, plain or weighted, and the shard list that realises a weighted mixture.

`data.train_shards` takes the plain forms (a glob, a directory, a comma list of tars, or a list
of those) or a mixture, a list of `{"path": SPEC, "weight": W}` (also as its JSON text, so
`--set data.train_shards='[{"path": "laion/", "weight": 3}, {"path": "cc12m/", "weight": 1}]'`
works). Each source's SPEC is any plain form.

A mixture is realised at the shard level, before DALI sees the list: every source's shards are
repeated (cycled in a seeded order) until the sources hold samples in the ratio of their
weights, no source dropping any of its own samples. DALI's webdataset reader then reads that
list like any other, so its checkpoint resumes a mixture exactly and every rank splits the
same list; the list is a pure function of (spec, seed, samples per shard). Ratios are exact up
to one shard per source; sources of very unequal size and weight repeat the small one.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

# More repetition than this means a tiny source with a large weight: almost surely a mistake
# (the mix would show the model the same few shards hundreds of times per epoch).
MAX_REPEAT = 1000


@dataclass(frozen=True)
class ShardSource:
    """One entry of a shard spec: a plain spec and its mixture weight (None: unweighted)."""

    spec: str
    weight: float | None = None


def parse_sources(spec) -> list[ShardSource]:
    """The entries of `spec` (any form described in the module docstring); raises ValueError
    naming the bad entry and the fix."""
    if isinstance(spec, str) and spec.strip().startswith("["):
        try:
            spec = json.loads(spec)
        except ValueError as err:
            raise ValueError(f"shard spec {spec!r} starts with '[' but is not JSON ({err}): "
                             'write [{"path": "dir/", "weight": 1}, ...]') from err
    if isinstance(spec, str):
        return [ShardSource(spec)] if spec.strip() else []
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"shard spec {spec!r} must be a string or a list")
    sources = [_parse_entry(entry) for entry in spec]
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(f"shard spec {spec!r} mixes weighted and plain entries: give every "
                         'entry as {"path": ..., "weight": ...}')
    return sources


def _parse_entry(entry) -> ShardSource:
    if isinstance(entry, str):
        return ShardSource(entry)
    if not isinstance(entry, dict) or set(entry) - {"path", "weight"} or "path" not in entry:
        raise ValueError(f"shard spec entry {entry!r} must be a path string or "
                         '{"path": SPEC, "weight": W}')
    weight = entry.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"shard spec entry {entry!r} has weight {weight!r}: use a number > 0")
    if not str(entry["path"]).strip():
        raise ValueError(f"shard spec entry {entry!r} has an empty path")
    return ShardSource(str(entry["path"]), float(weight))


def is_mixture(sources: list[ShardSource]) -> bool:
    return bool(sources) and sources[0].weight is not None


def mixture_shards(groups: list[list[str]], weights: list[float],
                   samples_per_shard: dict[str, int], seed: int) -> list[str]:
    """Shard list in which group i holds ~weights[i] / sum(weights) of the samples.

    The list length is set by the group that needs the most samples relative to its weight,
    so that group appears once and every other one is cycled (in a seeded order) up to its
    share. Returned grouped by source; the loader shuffles the whole list after."""
    sizes = [max(sum(samples_per_shard[s] for s in group), 1) for group in groups]
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    epoch = max(size / share for size, share in zip(sizes, shares))  # samples per mixed epoch
    rng = random.Random(seed)
    out: list[str] = []
    for group, size, share in zip(groups, sizes, shares):
        target = share * epoch
        if target > MAX_REPEAT * size:
            raise ValueError(f"shard mixture would repeat the {size} samples of {group[0]}... "
                             f"{target / size:.0f} times per epoch: lower its weight or add data")
        order = [s for s in group if samples_per_shard[s] > 0]
        if not order:
            raise ValueError(f"shard mixture source {group[0]}... holds no samples")
        rng.shuffle(order)
        taken = 0
        index = 0
        # Whole shards until the next one would overshoot by more than it would undershoot.
        while taken + samples_per_shard[order[index % len(order)]] / 2 <= target:
            shard = order[index % len(order)]
            out.append(shard)
            taken += samples_per_shard[shard]
            index += 1
    return out


__all__ = ["ShardSource", "parse_sources", "is_mixture", "mixture_shards", "MAX_REPEAT"]
