"""FLOP-balanced pipeline stages over [ViT layers; decoder layers].

The encoder and the decoder have different widths and sequence lengths (a ViT-g layer at
224 px costs ~10x a decoder-L layer), so an even split by layer count leaves stages idle.
We cost every layer (plus the patch embedding on the first and the vocabulary head on the
last) and cut the sequence into `pipeline x virtual` contiguous chunks that minimise the
most expensive chunk. The chunk holding the last ViT layer is the boundary: it runs the
encoder's final norm, token dropping, the projection and the caption embedding, so stages
before it send `[s_vit, b, w_vit]` and stages after it send `[s_dec, b, w_dec]`.

Chunk g runs on pipeline rank g % pipeline as virtual stage g // pipeline (megatron's
interleaved order).
"""

from __future__ import annotations

from dataclasses import dataclass

from ov2_megatron.variants import TransformerShape


@dataclass(frozen=True)
class StagePlan:
    vit_layers: tuple[int, int]
    """Global [start, stop) of the ViT layers in this chunk."""
    decoder_layers: tuple[int, int]
    """Global [start, stop) of the decoder layers in this chunk."""
    has_embedding: bool
    """Patch embedding, position embedding, CLS/register tokens (the first chunk)."""
    has_boundary: bool
    """Encoder final norm, token dropping, projection, caption embedding."""
    has_head: bool
    """Decoder final norm, vocabulary head, loss (the last chunk)."""

    @property
    def num_vit_layers(self) -> int:
        return self.vit_layers[1] - self.vit_layers[0]

    @property
    def num_decoder_layers(self) -> int:
        return self.decoder_layers[1] - self.decoder_layers[0]


def layer_flops(shape: TransformerShape, seq: int) -> float:
    """Forward FLOPs of one pre-LN layer per sample: QKV+proj 8sh^2, MLP 4shm, attention 4s^2h."""
    h, m = shape.width, shape.mlp_dim
    return 8 * seq * h * h + 4 * seq * h * m + 4 * seq * seq * h


def balanced_split(costs: list[float], chunks: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges, one per chunk, each non-empty, minimising the max sum."""
    n = len(costs)
    if chunks > n:
        raise ValueError(f"{chunks} pipeline chunks but only {n} layers: lower parallel.pipeline "
                         "or parallel.virtual_pipeline")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest max-chunk cost splitting the first i layers into k chunks.
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    for k in range(1, chunks + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    ranges, stop = [], n
    for k in range(chunks, 0, -1):
        start = cut[k][stop]
        ranges.append((start, stop))
        stop = start
    return ranges[::-1]


def plan_stages(vit: TransformerShape, vit_seq: int, decoder: TransformerShape,
                decoder_seq: int, head_flops: float, chunks: int) -> list[StagePlan]:
    """One StagePlan per chunk, in megatron's global chunk order."""
    n_vit, n_dec = vit.depth, decoder.depth
    costs = [layer_flops(vit, vit_seq)] * n_vit + [layer_flops(decoder, decoder_seq)] * n_dec
    costs[-1] += head_flops
    plans = []
    for start, stop in balanced_split(costs, chunks):
        vit_range = (min(start, n_vit), min(stop, n_vit))
        dec_range = (max(start, n_vit) - n_vit, max(stop, n_vit) - n_vit)
        plans.append(StagePlan(
            vit_layers=vit_range, decoder_layers=dec_range, has_embedding=start == 0,
            has_boundary=start < n_vit <= stop, has_head=stop == n_vit + n_dec))
    return plans


def chunk_index(pipeline_rank: int, vp_stage: int | None, pipeline: int) -> int:
    return (vp_stage or 0) * pipeline + pipeline_rank
