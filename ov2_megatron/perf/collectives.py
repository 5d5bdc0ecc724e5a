"""Time of one NCCL collective: a latency (alpha) and a bandwidth (beta) term.

The constants are NCCL's own cost model (src/graph/tuning.cc, NCCL 2.18-2.21,
https://github.com/NVIDIA/nccl/blob/master/src/graph/tuning.cc), Simple protocol (the one
NCCL picks for the megabyte messages training sends):
  base latency        8.4 us per collective (baseLat, Ring/Tree Simple)
  per-hop latency     NVLink 3.4 us (ring) / 4.0 us (tree); network 14 us (hwLat)
and the busbw convention of nccl-tests (https://github.com/NVIDIA/nccl-tests/blob/master/
doc/PERFORMANCE.md): for n ranks and B bytes,
  all-reduce      ring  alpha_base + 2 (n-1) hop + 2 (n-1)/n B / busbw
                  tree  alpha_base + 2 (log2(nodes) net_hop + (local-1) nvl_hop) + 2 B / busbw
                        (a double binary tree across nodes, a chain inside: latency grows with
                        log2 of the nodes, not with the ranks; its bandwidth term is the
                        ring's at large n)
  all-gather, reduce-scatter (ring only in NCCL)  alpha_base + (n-1) hop + (n-1)/n B / busbw
NCCL's tuner takes whichever algorithm is predicted faster; so does `all_reduce`.
Bandwidth: NVLink busbw when the group's ranks share a node, else the per-GPU network busbw
(the slowest link of a hierarchical ring carries every byte).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ov2_megatron.perf.hardware import Accelerator

BASE_LATENCY_S = 8.4e-6
NVLINK_RING_HOP_S = 3.4e-6
NVLINK_TREE_HOP_S = 4.0e-6
NETWORK_HOP_S = 14e-6


@dataclass(frozen=True)
class Group:
    """A process group as the collective sees it: its size and where its ranks sit."""

    ranks: int
    ranks_per_node: int
    """Ranks of this group on one node (1 when every rank is on a different node)."""

    @property
    def nodes(self) -> int:
        return max(1, math.ceil(self.ranks / self.ranks_per_node))


def group(ranks: int, stride: int, gpu: Accelerator) -> Group:
    """A group of `ranks` ranks `stride` apart in the global order (TP fastest)."""
    per_node = max(1, min(ranks, gpu.gpus_per_node // max(1, stride)))
    return Group(ranks, per_node)


def _bandwidth(g: Group, gpu: Accelerator) -> float:
    return gpu.intra_node_bandwidth if g.nodes == 1 else gpu.inter_node_bandwidth


def _ring_hop(g: Group) -> float:
    return NVLINK_RING_HOP_S if g.nodes == 1 else NETWORK_HOP_S


def ring_all_reduce(nbytes: float, g: Group, gpu: Accelerator) -> float:
    n = g.ranks
    if n <= 1:
        return 0.0
    return (BASE_LATENCY_S + 2 * (n - 1) * _ring_hop(g)
            + 2 * (n - 1) / n * nbytes / _bandwidth(g, gpu))


def tree_all_reduce(nbytes: float, g: Group, gpu: Accelerator) -> float:
    if g.ranks <= 1:
        return 0.0
    depth = math.log2(g.nodes) * NETWORK_HOP_S + (g.ranks_per_node - 1) * NVLINK_TREE_HOP_S
    return BASE_LATENCY_S + 2 * depth + 2 * nbytes / _bandwidth(g, gpu)


def all_reduce(nbytes: float, g: Group, gpu: Accelerator) -> float:
    """The faster of ring and tree, as NCCL's tuner chooses."""
    return min(ring_all_reduce(nbytes, g, gpu), tree_all_reduce(nbytes, g, gpu))


def all_gather(nbytes: float, g: Group, gpu: Accelerator) -> float:
    """`nbytes` is the gathered (full) buffer; each rank contributes nbytes / n."""
    n = g.ranks
    if n <= 1:
        return 0.0
    return BASE_LATENCY_S + (n - 1) * _ring_hop(g) + (n - 1) / n * nbytes / _bandwidth(g, gpu)


reduce_scatter = all_gather  # the same ring, run the other way: same alpha and beta


def send(nbytes: float, same_node: bool, gpu: Accelerator) -> float:
    """One point-to-point transfer (a pipeline stage boundary)."""
    bandwidth = gpu.intra_node_bandwidth if same_node else gpu.inter_node_bandwidth
    hop = NVLINK_RING_HOP_S if same_node else NETWORK_HOP_S
    return BASE_LATENCY_S + hop + nbytes / bandwidth
