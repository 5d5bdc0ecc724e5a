"""ImageCaptionLoader: webdataset shards -> DALI decode/augment -> {"images", "tokens"} batches.

Pipeline per data-parallel rank (one graph; only the decoder's device changes):
    readers.webdataset (image, .txt, .json; training: only the shards of this stream's range,
                        the range DALI's shard_id=dp_rank of num_shards=dp_size would read
                        (stream_split.py); eval: DALI's own split; shuffle buffer, seed;
                        index files made on first use: shard_index.py)
      -> python_function SampleFilter (header checks, caption from .txt or a .json field,
                                       placeholder swap, tokenization)
      -> decoders.image_random_crop (train) | decoders.image (eval)
         device "mixed" (nvJPEG on the GPU) when CUDA is there, "cpu" otherwise
      -> resize, bilinear antialiased: to R x R (train) | shorter side to R (eval)
      -> train: SimCLR colour jitter + random grayscale (color_jitter.py, DataConfig)
      -> crop_mirror_normalize (CHW float32, mean/std; eval: centre crop R x R; optional flip)
Every TP/PP rank of one replica passes the same dp_rank and gets the same batches: the stream
is a pure function of (shards, seed, dp_rank, dp_size, batch_size) and the restored state.

Bad samples never stop the stream: SampleFilter flags them, and here a flagged row is replaced
by a good row of the same batch (training: shapes stay fixed) or dropped (eval: metrics see
only real samples); each is counted by reason in `stats()`, and a window of bad samples warns
or, when entirely bad, raises naming the shards (bad_data.py). Decoder failures that slip past
the header checks are recovered from (see sample_filter.py and `_recover`). A weighted
mixture of shard sets is expanded into one shard list before DALI sees it (mixing.py).

Resume: `state()` holds DALI's own checkpoint taken through the iterator after the last
consumed batch (reader position, shuffle buffer RNG, augmentation RNG), plus our counters and
blocklist. A state is refused by a loader whose dp_rank, dp_size, batch_size, shard list or
mode differ: DALI would load it silently into such a pipeline and replay the wrong samples.
It is refused too, with the reason, by a loader whose colour ops are switched on or off (the
graph differs; DALI would fail on an unknown operator name).
"""

from __future__ import annotations

import base64
import random
import warnings
from collections import Counter

import torch

from ov2_megatron.data.bad_data import BadDataMonitor
from ov2_megatron.data.config import DataConfig, every_letter_case, shards_digest
from ov2_megatron.data.mixing import is_mixture, mixture_shards, parse_sources
from ov2_megatron.data.sample_checks import Issue
from ov2_megatron.data.shard_index import ensure_indexes
from ov2_megatron.data.shard_table import build_table
from ov2_megatron.data.stream_split import stream_shards
from ov2_megatron.data.sample_filter import SampleFilter
from ov2_megatron.data.tokenizer import CaptionTokenizer

# 2: the graph gained the caption-candidate draw and source_info ops (v1 checkpoints of DALI
# name operators this graph lacks, so they cannot load).
# 3: a training reader holds only its stream's range (stream_split.py): a v2 reader position
# counts from the start of the whole list.
_STATE_VERSION = 3
_ISSUE_NAMES = tuple(issue.metric_name for issue in Issue if issue != Issue.OK)
_TOTAL_NAMES = ("samples", "replaced", "dropped", "batches_skipped", "recoveries")
_MAX_RECOVERIES_PER_BATCH = 3
# The official central_crop starts at floor((side - R) / 2); DALI rounds crop_pos * (side - R)
# half up, so 0.5 would shift an odd margin by a pixel. Exact for margins up to 500,000.
_CENTRE = 0.5 - 1e-6


def resolve_device(device: str) -> str:
    """"auto" -> "gpu" when CUDA is available, else "cpu"."""
    if device not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"device {device!r} must be 'auto', 'cpu' or 'gpu'")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else device


def build_pipeline(config: DataConfig, shards: list[str], *, dp_rank: int, dp_size: int,
                   batch_size: int, training: bool, device: str, sample_filter: SampleFilter,
                   checkpoint: bytes | None = None, index_paths: list[str] | None = None,
                   reader_split: tuple[int, int] | None = None):
    """The DALI pipeline described in the module docstring (not yet built). `reader_split`:
    the reader's (shard_id, num_shards), default (dp_rank, dp_size); (0, 1) when `shards`
    holds only this stream's range (stream_split.py)."""
    from nvidia.dali import pipeline_def

    device_id = torch.cuda.current_device() if device == "gpu" else None
    # Conditionals: the colour jitter branches per sample (color_jitter.py).
    graph = pipeline_def(_graph, enable_conditionals=True)
    # Different ranks must not draw the same crop sequence; the reader seed only orders its
    # own shard, so deriving both from (seed, rank) is safe.
    if index_paths is None:
        index_paths = ensure_indexes(shards, config.index_cache_dir)
    shard_id, num_shards = reader_split or (dp_rank, dp_size)
    return graph(config, shards, index_paths, shard_id, num_shards, training, device,
                 sample_filter, batch_size=batch_size, num_threads=config.num_threads,
                 device_id=device_id, seed=(config.seed * 1_000_003 + dp_rank) % (2**31),
                 prefetch_queue_depth=config.prefetch, enable_checkpointing=True,
                 checkpoint=checkpoint)


def _graph(config: DataConfig, shards: list[str], index_paths: list[str] | None, dp_rank: int,
           dp_size: int, training: bool, device: str, sample_filter: SampleFilter):
    """The graph of `build_pipeline` (traced by DALI's autograph for the conditionals)."""
    from nvidia.dali import fn, types

    size = config.resolution
    jpegs, texts, metas = fn.readers.webdataset(
        paths=shards, index_paths=index_paths,
        ext=[";".join(every_letter_case(config.image_extensions)), "txt", "json"],
        missing_component_behavior="empty",  # a missing entry is empty; SampleFilter says why
        dont_use_mmap=config.dont_use_mmap,
        shard_id=dp_rank, num_shards=dp_size, random_shuffle=training,
        initial_fill=config.shuffle_buffer, pad_last_batch=not training, name="reader")
    # One uniform draw per sample picks a caption among candidates: a DALI random op, so the
    # pick changes every epoch, follows the seed and is restored by the checkpoint.
    draws = fn.random.uniform(range=[0.0, 1.0])
    sources = [fn.get_property(x, key="source_info") for x in (jpegs, texts, metas)]
    jpegs, tokens, issues, captions, bad_sources = fn.python_function(
        jpegs, texts, metas, draws, *sources, function=sample_filter, num_outputs=5,
        batch_processing=True)
    bad_sources = fn.pad(bad_sources, fill_value=0)  # [B, max_len] uint8, empty rows all NUL
    decoder_device = "mixed" if device == "gpu" else "cpu"
    decoder_args = _gpu_decoder_args(config) if device == "gpu" else {}
    # The official inception_crop / resize_small: bilinear with antialiasing when shrinking.
    resize_args = {"interp_type": types.INTERP_LINEAR, "antialias": True}
    mean = [255.0 * m for m in config.mean]
    std = [255.0 * s for s in config.std]
    if not training:
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                                   **decoder_args)
        if config.eval_resize == "squash":
            images = fn.resize(images, resize_x=size, resize_y=size, **resize_args)
            crop = {}
        else:
            images = fn.resize(images, resize_shorter=size, **resize_args)
            crop = dict(crop=(size, size), crop_pos_x=_CENTRE, crop_pos_y=_CENTRE)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=mean, std=std, **crop)
        return images, tokens, issues, bad_sources, fn.pad(captions, fill_value=0)
    images = fn.decoders.image_random_crop(
        jpegs, device=decoder_device, output_type=types.RGB,
        random_area=list(config.crop_scale), random_aspect_ratio=list(config.crop_ratio),
        num_attempts=10, **decoder_args)
    images = fn.resize(images, resize_x=size, resize_y=size, **resize_args)  # [R, R, 3] uint8
    images = _color_augment(images, config)
    mirror = fn.random.coin_flip(probability=0.5) if config.flip else 0
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=mean, std=std, mirror=mirror)
    return images, tokens, issues, bad_sources


def _gpu_decoder_args(config: DataConfig) -> dict:
    """The mixed decoder's settings. nvJPEG's default chroma upsampling differs from
    libjpeg-turbo's: ask for the CPU's, so GPU and CPU runs (and the CPU-tested pixels) agree.
    The hardware engines take `hw_decoder_load` of the JPEGs (the fused random-crop decoder
    uses them too, DALI 2.x); buffers preallocated for `decoder_size_hint` sides."""
    args = {"jpeg_fancy_upsampling": True, "hw_decoder_load": config.hw_decoder_load}
    if config.decoder_size_hint:
        args.update(preallocate_width_hint=config.decoder_size_hint,
                    preallocate_height_hint=config.decoder_size_hint)
    return args


def color_ops(config: DataConfig, training: bool = True) -> str:
    """Which colour ops a loader's graph has: "none", "grayscale" (grayscale only) or "jitter"
    (the jitter and the grayscale branch). Only this, not the strengths or probabilities,
    shapes the graph a DALI checkpoint belongs to."""
    if not training:
        return "none"
    if config.color_jitter > 0 and config.color_jitter_probability > 0:
        return "jitter"
    return "grayscale" if config.grayscale_probability > 0 else "none"


def _color_augment(images, config: DataConfig):
    """The official simclr_jitter_gray with the config's strength and probabilities; no ops
    at all when both are off, so such a stream keeps the pixels of the crop + resize."""
    ops = color_ops(config)
    if ops == "none":
        return images
    from ov2_megatron.data import color_jitter

    jitter = ops == "jitter"
    strengths = color_jitter.JitterStrengths.simclr(config.color_jitter if jitter else 0.0)
    draws = color_jitter.draw(strengths, config.color_jitter_probability if jitter else 0.0,
                              config.grayscale_probability)
    return color_jitter.simclr_jitter_gray(images, strengths, draws)


class DecodeProbe:
    """Decodes encoded images one at a time with the loader's decoder, to tell which of them
    break it. One pipeline serves all images; it is rebuilt only after a failure (DALI
    invalidates a pipeline that raised)."""

    def __init__(self, device: str):
        self.device = device
        self._pipe = None

    def _build(self):
        from nvidia.dali import Pipeline, fn

        device_id = torch.cuda.current_device() if self.device == "gpu" else None
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=device_id,
                        prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            encoded = fn.external_source(name="encoded", device="cpu")
            pipe.set_outputs(fn.decoders.image(
                encoded, device="mixed" if self.device == "gpu" else "cpu"))
        pipe.build()
        return pipe

    def failing(self, images: list[bytes]) -> list[bytes]:
        import numpy as np

        bad = []
        for data in images:
            if self._pipe is None:
                self._pipe = self._build()
            try:
                self._pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
                self._pipe.run()
            except RuntimeError:
                bad.append(data)
                self._pipe = None
        return bad


class ImageCaptionLoader:
    """Iterable of {"images": float32 [B,3,R,R], "tokens": int64 [B,L], "captions" (eval)}.

    Training: an endless stream (the reader wraps around epochs; with stick_to_shard off each
    rank moves to the next shard every epoch). Eval (`training=False`): one pass over this
    rank's part of the shards per `iter()`, no shuffle, center crop, bad rows dropped.
    Images and tokens are on the GPU when the pipeline decodes there.
    """

    def __init__(self, config: DataConfig, *, dp_rank: int, dp_size: int, batch_size: int,
                 training: bool = True, resume_state: dict | None = None, device: str = "auto",
                 shards: str | list | None = None, table=None):
        config.validate()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        spec = shards if shards is not None else (config.train_shards if training
                                                  else config.val_shards)
        if not spec:
            raise ValueError("DataConfig.val_shards is empty but an eval loader was requested: "
                             "set val_shards or pass shards=")
        self.config, self.training = config, training
        self.dp_rank, self.dp_size, self.batch_size = dp_rank, dp_size, batch_size
        self._table = table if table is not None else build_table(spec,
                                                                  config.index_cache_dir)
        self.shards, self._index_paths, self.mixture = self._resolve(spec)
        self._reader_shards, self._reader_indexes, self._reader_split = self._reader_inputs()
        self.tokenizer = CaptionTokenizer.from_file(config.tokenizer_model)
        self._filter = SampleFilter(self.tokenizer, config.caption_length, config.max_image_pixels,
                                    caption_key=config.caption_key, sample_candidates=training,
                                    max_caption_bytes=config.max_caption_bytes)
        self._monitor = BadDataMonitor(config.bad_sample_window, config.bad_sample_warn_fraction)
        self._stats: Counter = Counter()
        self._batches = 0
        checkpoint = None
        if resume_state is not None:
            checkpoint = self._load_state(resume_state)
        self._checkpoint = checkpoint
        self._needs_reset = False
        self.device = resolve_device(device)
        why = "no CUDA device" if device == "auto" else f"device={device!r} asked for"
        try:
            self._build(checkpoint)
        except RuntimeError as err:
            if device != "auto" or self.device != "gpu":
                raise
            warnings.warn(f"GPU decoding unavailable ({err}); falling back to CPU decoding",
                          stacklevel=2)
            self.device, why = "cpu", f"GPU decoding failed to build: {str(err).splitlines()[0]}"
        self.decoding = (
            f"decoding on the GPU (DALI mixed: nvJPEG, hardware decoder share "
            f"{config.hw_decoder_load})" if self.device == "gpu" else
            f"decoding on the CPU (DALI cpu: libjpeg-turbo, {config.num_threads} threads per "
            f"rank): {why}")

    def _resolve(self, spec) -> tuple[list[str], list[str], list[tuple[str, float]]]:
        """(the seeded shard list of the set, its index paths, [(source spec, weight)] of a
        mixture), from the shard table (shard_table.py: resolved, checked and indexed, by this
        loader or once for the run)."""
        sources, table = parse_sources(spec), self._table
        groups = [list(group) for group in table.groups]
        mixture: list[tuple[str, float]] = []
        if self.training and is_mixture(sources):
            shards = mixture_shards(groups, [s.weight for s in sources], table.count,
                                    self.config.seed)
            mixture = [(s.spec, s.weight) for s in sources]
        else:
            shards = [shard for group in groups for shard in group]
        if self.training:  # one seeded order for all ranks: the streams split this list
            random.Random(self.config.seed).shuffle(shards)
        return shards, [table.index[shard] for shard in shards], mixture

    def _reader_inputs(self) -> tuple[list[str], list[str], tuple[int, int] | None]:
        """(shards, index paths, reader split) DALI's reader gets. Training: this stream's
        range only (stream_split.py). Evaluation reads small sets, split by DALI itself with
        the per-range padding its reader does."""
        if not self.training:
            return self.shards, self._index_paths, None
        counts = [self._table.count[shard] for shard in self.shards]
        shards, indexes = stream_shards(self.shards, self._index_paths, counts, self.dp_rank,
                                        self.dp_size, self.config.index_cache_dir)
        return shards, indexes, (0, 1)

    def _build(self, checkpoint: bytes | None) -> None:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._pipe = build_pipeline(self.config, self._reader_shards, dp_rank=self.dp_rank,
                                    dp_size=self.dp_size, batch_size=self.batch_size,
                                    training=self.training, device=self.device,
                                    sample_filter=self._filter, checkpoint=checkpoint,
                                    index_paths=self._reader_indexes,
                                    reader_split=self._reader_split)
        self._pipe.build()
        names = ["images", "tokens", "issues", "sources"] + ([] if self.training
                                                              else ["captions"])
        # Training has no reader_name: the iterator never ends an epoch, so there is no epoch
        # bookkeeping to checkpoint and no padded duplicate at an epoch edge.
        self._iter = DALIGenericIterator(
            [self._pipe], names, reader_name=None if self.training else "reader",
            auto_reset=False, prepare_first_batch=False,
            last_batch_policy=LastBatchPolicy.FILL if self.training else LastBatchPolicy.PARTIAL)

    def __iter__(self) -> "ImageCaptionLoader":
        if self._needs_reset:  # eval: each iter() is one more full pass
            self._iter.reset()
            self._needs_reset = False
        return self

    def __next__(self) -> dict:
        recoveries = 0
        while True:
            try:
                out = next(self._iter)[0]
            except StopIteration:
                self._needs_reset = True
                raise
            except RuntimeError as err:
                recoveries += 1
                if recoveries > _MAX_RECOVERIES_PER_BATCH or not self._recover(err):
                    raise
                continue
            self._checkpoint = self._iter.checkpoints()[0]
            self._batches += 1
            batch = self._finish(out)
            if batch is not None:
                return batch

    def _finish(self, out: dict) -> dict | None:
        """Count issues; replace (train) or drop (eval) flagged rows."""
        issues = out["issues"].reshape(-1).cpu()  # [B]
        images, tokens = out["images"], out["tokens"].to(torch.int64)
        bad = issues != Issue.OK
        n_bad = int(bad.sum())
        self._stats["samples"] += len(issues)
        if n_bad:
            for code, count in Counter(issues[bad].tolist()).items():
                self._stats[Issue(code).metric_name] += count
        self._monitor.update(issues.tolist(), _sources(out["sources"], bad) if n_bad
                             else [""] * len(issues))
        batch: dict = {}
        if not self.training:
            keep = torch.nonzero(~bad).reshape(-1)
            self._stats["dropped"] += n_bad
            raw = out["captions"].cpu()[keep]  # [b, max_bytes] uint8, NUL padded
            batch["captions"] = [bytes(row.tolist()).rstrip(b"\0").decode("utf-8") for row in raw]
            if n_bad:
                images, tokens = images[keep.to(images.device)], tokens[keep]
            if len(keep) == 0:
                return None
        elif n_bad:
            good = torch.nonzero(~bad).reshape(-1)
            if len(good) == 0:
                self._stats["batches_skipped"] += 1
                return None
            source = torch.arange(len(issues))
            bad_rows = torch.nonzero(bad).reshape(-1)
            source[bad_rows] = good[torch.arange(n_bad) % len(good)]  # deterministic reuse
            images, tokens = images[source.to(images.device)], tokens[source]
            self._stats["replaced"] += n_bad
        batch["images"] = images                    # [B, 3, R, R] float32
        batch["tokens"] = tokens.to(images.device)  # [B, L] int64: BOS ... EOS PAD ... PAD
        return batch

    def _recover(self, error: RuntimeError) -> bool:
        """A batch failed inside DALI. DALI invalidates the pipeline when any in-flight batch
        fails, so the culprit is in one of the next `prefetch + 1` batches after the last
        checkpoint: replay those from the checkpoint while the filter captures their encoded
        images, decode each alone to find the culprit(s), blocklist them and rebuild. Returns
        False when no image is to blame (then the error is not a data problem)."""
        in_flight = self.config.prefetch + 1
        self._filter.captured = []
        self._filter.capture_batches = in_flight
        self._close()
        self._build(self._checkpoint)
        for _ in range(in_flight):
            try:
                next(self._iter)
            except (RuntimeError, StopIteration):
                break  # expected: the replay fails again, after the filter captured it
        self._filter.capture_batches = 0
        culprits = DecodeProbe(self.device).failing(self._filter.captured)
        self._filter.captured = []
        for data in culprits:
            self._filter.block(data)
        self._close()
        self._build(self._checkpoint)
        self._stats["recoveries"] += 1
        return bool(culprits)

    def _close(self) -> None:
        self._iter = None
        self._pipe = None

    def stats(self) -> dict[str, int]:
        """Bad samples by reason (Issue names, e.g. "truncated_jpeg"), cumulative and carried
        across resume. Only reasons that occurred appear; the sum is the bad-sample count."""
        return {name: self._stats[name] for name in _ISSUE_NAMES if self._stats[name]}

    def totals(self) -> dict[str, int]:
        """Other cumulative counters: samples read (good and bad), rows replaced (training) or
        dropped (eval), batches skipped because every row was bad, decoder-failure recoveries."""
        return {name: self._stats[name] for name in _TOTAL_NAMES}

    def state(self) -> dict:
        """Picklable (plain types only) state that resumes this exact stream."""
        checkpoint = self._checkpoint if self._checkpoint is not None else \
            self._iter.checkpoints()[0]
        return {**self._identity(), "batches": self._batches,
                "stats": dict(self._stats), "blocklist": self._filter.blocked(),
                "caption_key": self.config.caption_key,
                "dali": base64.b64encode(checkpoint if isinstance(checkpoint, bytes)
                                         else checkpoint.encode()).decode("ascii")}

    def _identity(self) -> dict:
        """What a resume_state must match: the exact split, list and graph DALI recorded.
        The shard digest covers a mixture's expanded list (so its weights); the mixture is
        listed too, so a refusal can say which weight changed."""
        return {"version": _STATE_VERSION, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "batch_size": self.batch_size, "training": self.training,
                "shards": shards_digest(sorted(self.shards)), "seed": self.config.seed,
                "color_ops": color_ops(self.config, self.training),
                "mixture": [[_spec_names(spec), weight] for spec, weight in self.mixture]}

    def _load_state(self, state: dict) -> bytes:
        expected = self._identity()
        state = {"color_ops": "none", **state}  # states saved before the colour ops had none
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data loader resume_state has {key}={state.get(key)!r} but this loader has "
                    f"{key}={value!r}. A DALI checkpoint records reader positions for one exact "
                    "split of the shards, and the random state of one exact graph; it cannot "
                    "be re-split or moved. Resume with the same data-parallel size, batch size, "
                    "shards, seed and colour ops (color_jitter / grayscale_probability on or "
                    "off), or start a fresh stream with --set train.resume_data_stream=false "
                    "(samples already seen will be seen again).")
        if state.get("caption_key", "") != self.config.caption_key:
            warnings.warn(f"data.caption_key changed since the checkpoint "
                          f"({state.get('caption_key', '')!r} -> {self.config.caption_key!r}): "
                          "the stream resumes, with captions from the new field", stacklevel=3)
        self._stats = Counter(state["stats"])
        self._batches = int(state["batches"])
        self._filter.restore_blocklist(state["blocklist"])
        return base64.b64decode(state["dali"])


def _sources(padded: torch.Tensor, bad: torch.Tensor) -> list[str]:
    """Per-row source_info text of bad rows ("" for good ones), from the NUL-padded bytes."""
    rows = padded.cpu()
    return [bytes(rows[i].tolist()).rstrip(b"\0").decode("utf-8", "replace") if is_bad else ""
            for i, is_bad in enumerate(bad.tolist())]


def _spec_names(spec: str) -> str:
    # Base names only (as shards_digest): a dataset moved to another mount point still resumes.
    return ",".join(part.rstrip("/").rsplit("/", 1)[-1] for part in spec.split(","))


__all__ = ["ImageCaptionLoader", "DecodeProbe", "build_pipeline", "color_ops",
           "resolve_device"]
