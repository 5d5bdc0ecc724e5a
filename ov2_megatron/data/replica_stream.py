"""The training rows of one data-parallel replica, read from a split of the data fixed at the
run's first start, so that a run resumed on another data-parallel size reads on where it
stopped: no sample is repeated or skipped.

A DALI stream is bound to one split: its checkpoint holds reader positions within the range
of samples `shard_id` of `num_shards` reads, and cannot be re-split. So the split never
changes. At the first start the data is cut into S streams, S = the data-parallel size then;
stream s is the ImageCaptionLoader with dp_rank=s, dp_size=S and batch size b = the
micro-batch then. Every optimizer step takes G/S rows from each stream, in stream order, and
the step's global batch of G rows is that concatenation. Replica r of D reads its rows
[r*G/D, (r+1)*G/D):

    D == S   its own stream, as always (the loader is passed through);
    D <  S   whole streams: 2 -> 1, the one replica runs both streams, and nothing is wasted;
    D >  S   a slice of one stream: 1 -> 2, both replicas run the stream, each keeps its
             half of every step (decoding the other half is the price of exactness: start a
             fresh split with train.resume_data_stream=false to avoid it).

Every sample then lands in the same optimizer step, at the same global position (so with
the same token-drop indices) as in a run that never changed layout; only which replica
computes it changes. A global batch changed at the resume must still split into the
streams (a multiple of S*b); a changed micro-batch is re-batched.
"""

from __future__ import annotations

from collections import Counter

import torch

from ov2_megatron.data.config import DataConfig

STATE_KIND = "replica_stream"


def stream_states(state) -> list[dict]:
    """The loader states in a saved data state: a ReplicaStream's, or one loader's (a
    checkpoint from before the split was kept)."""
    if state is None:
        return []
    if isinstance(state, dict) and state.get("kind") == STATE_KIND:
        return list(state["streams"])
    return [state]


class ReplicaStream:
    """Iterable of micro-batches {"images", "tokens"} of `micro_batch` rows for replica
    `replica` of `replicas`; `saved` are the loader states of every stream of the split (from
    all replicas of the checkpoint), or None for a fresh split; `table`: the training set's
    ShardTable, built once for the run (shard_table.py), else by each loader."""

    def __init__(self, config: DataConfig, *, replica: int, replicas: int, micro_batch: int,
                 global_batch: int, saved: list[dict] | None = None, device: str = "auto",
                 table=None):
        from ov2_megatron.data.dali_pipeline import ImageCaptionLoader

        by_stream = {int(state["dp_rank"]): state for state in saved or []}
        streams, stream_batch = _split_of(saved, replicas, micro_batch)
        _check_split(streams, stream_batch, replicas, micro_batch, global_batch)
        self.micro_batch, self.streams, self.stream_batch = micro_batch, streams, stream_batch
        self._rows = global_batch // streams  # per stream and step
        self._pieces = _pieces(replica, replicas, streams, global_batch)
        missing = [s for s, _, _ in self._pieces if saved and s not in by_stream]
        if missing:
            raise ValueError(f"the checkpoint's data state lacks stream(s) {missing} of "
                             f"{streams}: a rank file is missing; restore it, or start a fresh "
                             "stream with --set train.resume_data_stream=false")
        self.loaders = {s: ImageCaptionLoader(config, dp_rank=s, dp_size=streams,
                                              batch_size=stream_batch,
                                              resume_state=by_stream.get(s), device=device,
                                              table=table)
                        for s, _, _ in self._pieces}
        self._passthrough = len(self._pieces) == 1 and stream_batch == micro_batch \
            and self._pieces[0][1:] == (0, self._rows)
        self._iter = None

    def describe(self) -> str:
        """One line for the log, when the replica does not simply read its own stream."""
        parts = [f"stream {s} rows {a}-{e - 1} of {self._rows}" for s, a, e in self._pieces]
        return (f"data: the split of the first start ({self.streams} streams of batch "
                f"{self.stream_batch}) is kept; this replica reads " + ", ".join(parts))

    @property
    def decoding(self) -> str:
        """Where and how the images are decoded, and why (the loaders' shared answer)."""
        return next(iter(self.loaders.values())).decoding

    @property
    def passthrough(self) -> bool:
        return self._passthrough

    def __iter__(self) -> "ReplicaStream":
        if self._iter is None:
            only = next(iter(self.loaders.values()))
            self._iter = iter(only) if self._passthrough else self._micro_batches()
        return self

    def __next__(self) -> dict:
        return next(self._iter)

    def _micro_batches(self):
        iterators = {s: iter(loader) for s, loader in self.loaders.items()}
        while True:  # one optimizer step per pass: the buffer is empty between steps
            step = [_rows(iterators[s], self._rows // self.stream_batch, first, end)
                    for s, first, end in self._pieces]
            images = torch.cat([piece["images"] for piece in step])  # [G/D, 3, R, R]
            tokens = torch.cat([piece["tokens"] for piece in step])  # [G/D, L]
            for start in range(0, len(images), self.micro_batch):
                yield {"images": images[start:start + self.micro_batch],
                       "tokens": tokens[start:start + self.micro_batch]}

    def state(self) -> dict:
        return {"kind": STATE_KIND, "streams": [loader.state() for loader in
                                                 self.loaders.values()]}

    def stats(self) -> dict[str, int]:
        return dict(sum((Counter(loader.stats()) for loader in self.loaders.values()),
                        Counter()))

    def totals(self) -> dict[str, int]:
        return dict(sum((Counter(loader.totals()) for loader in self.loaders.values()),
                        Counter()))


def _split_of(saved: list[dict] | None, replicas: int, micro_batch: int) -> tuple[int, int]:
    """(streams, stream batch): the saved split's, or this layout's for a fresh one."""
    if not saved:
        return replicas, micro_batch
    splits = {(int(state["dp_size"]), int(state["batch_size"])) for state in saved}
    if len(splits) != 1:
        raise ValueError(f"the checkpoint's data states disagree on the split {sorted(splits)}: "
                         "damaged; start a fresh stream with --set "
                         "train.resume_data_stream=false")
    return splits.pop()


def _check_split(streams: int, stream_batch: int, replicas: int, micro_batch: int,
                 global_batch: int) -> None:
    if global_batch % (streams * stream_batch) or global_batch % (replicas * micro_batch):
        raise ValueError(
            f"train.global_batch {global_batch} does not split into the data stream's "
            f"{streams} streams of batch {stream_batch} (kept from the run's first start) and "
            f"this layout's {replicas} replicas of micro-batch {micro_batch}: it must be a "
            f"multiple of {streams * stream_batch} and of {replicas * micro_batch}; change it, "
            "or start a fresh stream with --set train.resume_data_stream=false")


def _pieces(replica: int, replicas: int, streams: int, global_batch: int):
    """[(stream, first row, end row)] of each stream's step rows that replica reads."""
    rows, share = global_batch // streams, global_batch // replicas
    low, high = replica * share, (replica + 1) * share
    return [(s, max(low, s * rows) - s * rows, min(high, (s + 1) * rows) - s * rows)
            for s in range(streams) if s * rows < high and (s + 1) * rows > low]


def _rows(iterator, batches: int, first: int, end: int) -> dict:
    """Rows [first, end) of the next `batches` batches of a stream (one step's worth)."""
    pulled = [next(iterator) for _ in range(batches)]
    return {key: torch.cat([batch[key] for batch in pulled])[first:end]
            for key in ("images", "tokens")}
