"""DataConfig: everything the image-caption data path needs, checked once before any compute.

`validate()` checks the numbers; `resolve_shards()` turns the shard spec (glob, directory,
comma list, or a weighted mixture of those: mixing.py) into concrete tar paths and opens each
one, so a missing, unreadable or non-tar shard is a clear start-up error instead of a crash
inside a DALI worker thread hours later.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass

from ov2_megatron.config import check_minimums
from ov2_megatron.data.shard_spec import check_shard, resolve_plain_spec, resolve_shard_spec

# ImageNet's normalisation constants: what the official OpenVision 2 recipe trains with
# (big_vision's `vgg_value_range`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CLIP's, for encoders imported or exported with them (an OpenCLIP preprocess_cfg may name
# either).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# tf.image.random_contrast / random_saturation need 1 - 0.8 * strength >= 0.
MAX_COLOR_JITTER = 1.25



@dataclass
class DataConfig:
    """Image-caption data: shards, tokenizer, augmentation and loader settings."""

    train_shards: str | list = ""
    """Training shards: a glob (`data/shard-*.tar`), a directory (all `*.tar` in it), a
    comma-separated list of tar paths, a list of those, or a weighted mixture
    `[{"path": SPEC, "weight": W}, ...]` (or its JSON text; see mixing.py). Each shard is a
    webdataset tar of `KEY.<image>` (image_extensions) with `KEY.txt` and/or `KEY.json`, as
    tools/prepare_shards.py, img2dataset and similar tools write."""

    val_shards: str | list = ""
    """Validation shards, same syntax as `train_shards` (weights are ignored: every validation
    sample is read once); empty means no validation set."""

    caption_key: str = ""
    """Where the caption is: empty reads `KEY.txt`; a field name reads that field of
    `KEY.json` (`re_caption` for Recap-DataComp), dots walk into nested objects
    (`meta.caption`). A list in the field is a list of candidates: one is drawn per sample
    per epoch from the seed (resumes exactly); evaluation takes the first."""

    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    """Entry extensions read as the image, first match wins, in any letter case (`KEY.JPG`
    from a camera is an image too): what img2dataset writes (`--output_format webdataset`
    with jpg, png or webp encoding). The header check reads the real format from the bytes,
    so a PNG named .jpg is still fine."""

    index_cache_dir: str = ""
    """Where DALI index files of shards that have none are made when the shard directory is
    read-only (otherwise they go beside the shard, `X.tar` -> `X.idx`). Empty:
    ~/.cache/ov2_megatron/wds-index."""

    bad_sample_warn_fraction: float = 0.05
    """Warn (naming the reasons and shards) when more than this fraction of the samples of a
    window of `bad_sample_window` samples had to be replaced."""

    bad_sample_window: int = 1024
    """Samples per bad-data window. When every sample of one window is bad the loader raises,
    naming the shards and reasons, instead of skipping batches forever."""

    tokenizer_model: str = ""
    """Path of the SentencePiece `.model` (see tools/train_tokenizer.py)."""

    resolution: int = 224
    """Square output side in pixels (84 for stage 1, 224+ for stage 2 of the OpenVision recipe)."""

    caption_length: int = 128
    """Tokens per caption row (the official token_len): BOS, at most caption_length - 3
    pieces, EOS and PAD in the first caption_length - 1 slots, then one appended PAD (see
    tokenizer.py). The decoder input is caption_length - 1 tokens."""

    crop_scale: tuple[float, float] = (0.4, 1.0)
    """Random-resized-crop area range, as fractions of the image. Narrower than torchvision's
    (0.08, 1) because captions describe the whole image: a 8% crop loses what they mention."""

    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """Random-resized-crop aspect-ratio range (width / height), torchvision's default."""

    flip: bool = False
    """Random horizontal flip. Off by default: captions say "left" and "right"."""

    eval_resize: str = "squash"
    """Evaluation images: "squash" (bilinear resize of the whole image to the square input, as
    the released OpenVision checkpoints declare and every export's image-processor config
    says: data/preprocess.py) or "shortest" (shorter side, then the official central crop)."""

    color_jitter: float = 0.4
    """SimCLR colour-jitter strength s: brightness, contrast and saturation change by up to
    0.8 s, hue by up to 0.2 s of the circle, in a random order (color_jitter.py). 0.4 is the
    official recipe's `simclr_jitter_gray(jitter_strength=0.4)`; 0 disables it (as for
    captions that name colours the pixels must keep, see recipes.tiny_cpu)."""

    color_jitter_probability: float = 0.8
    """Fraction of images that get the colour jitter (the official random_apply p=0.8)."""

    grayscale_probability: float = 0.2
    """Fraction of images turned gray after the jitter (the official p=0.2); 0 disables it."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after scaling pixels to [0, 1]: ImageNet's, as the official
    OpenVision 2 recipe (an imported encoder may bring its own)."""

    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided out after subtracting the mean."""

    num_threads: int = 4
    """DALI CPU worker threads per data-parallel rank (decode, crop, resize on CPU)."""

    hw_decoder_load: float = 0.65
    """GPU decoding (DALI "mixed"): share of the JPEG work sent to the GPU's hardware JPEG
    engines (A100: 5 NVJPG, H100/H200: 7), the rest to nvJPEG's hybrid CUDA + CPU-thread
    path. DALI's default; raise it (0.8-0.9) when CPU threads are scarce, which at stage 1's
    84 px is the usual bottleneck. tools/gpu_check.sh measures images/s per GPU."""

    decoder_size_hint: int = 0
    """GPU decoding: the typical largest image side, to preallocate the hardware decoder's
    buffers (DALI preallocate_width/height_hint) so that no allocation happens mid-run;
    e.g. 128 for a stage-1 copy from tools/prepare_shards.py --resize, 0: none."""

    seed: int = 0
    """Base seed of shuffling and augmentation; each data-parallel rank derives its own."""

    prefetch: int = 2
    """Batches DALI prepares ahead of the one being consumed (prefetch_queue_depth)."""

    shuffle_buffer: int = 1024
    """Samples in the reader's shuffle buffer; DALI's webdataset reader mixes only within it,
    shard order is shuffled once from the seed on top of that."""

    dont_use_mmap: bool = False
    """DALI's reader option: read shards with plain file I/O instead of memory-mapping them.
    Set it on Lustre, GPFS and NFS, where mapped reads are slow, and at 65,530+ shards per
    rank (the default vm.max_map_count: every mapped shard is one mapping). The shuffle
    buffer then holds copies of the encoded samples (anonymous memory, counted by --dry-run's
    loader estimate) instead of page-cache views."""

    max_image_pixels: int = 40_000_000
    """Images whose header declares more pixels than this are replaced, not decoded: a
    decompression bomb would otherwise stall or OOM a decoder thread."""

    max_caption_bytes: int = 8192
    """Captions longer than this (UTF-8 bytes, before tokenization) are skipped and counted as
    `caption_too_long`. Only the first caption_length - 3 pieces are trained on (about 500
    bytes at 128), so 8 KiB keeps every real caption, long re-captions included, while a
    runaway entry (a scraped page as its caption) cannot stall each batch that tokenizes it."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and how to fix it."""
        from ov2_megatron.data.mixing import parse_sources

        self.validate_numbers()
        try:
            sources = parse_sources(self.train_shards)
        except ValueError as err:
            raise ValueError(f"DataConfig.train_shards: {err}") from None
        if not sources:
            raise ValueError("DataConfig.train_shards is empty: set it to a glob, directory or "
                             "comma list of webdataset .tar shards (tools/prepare_shards.py)")
        if any(not ext or "." in ext or ";" in ext for ext in self.image_extensions) or \
                not self.image_extensions:
            raise ValueError(f"DataConfig.image_extensions {self.image_extensions} must be "
                             "non-empty names without dots, e.g. ('jpg', 'png')")
        if self.caption_key.startswith(".") or self.caption_key.endswith(".") or \
                ".." in self.caption_key:
            raise ValueError(f"DataConfig.caption_key {self.caption_key!r} has an empty part: "
                             "write a field name or a dotted path such as meta.caption")
        if not self.tokenizer_model:
            raise ValueError("DataConfig.tokenizer_model is empty: set it to a SentencePiece "
                             ".model file (tools/train_tokenizer.py)")

    def validate_numbers(self) -> None:
        """The checks that need no files (also run for the synthetic set before it is built)."""
        from ov2_megatron.data.preprocess import RESIZE_MODES

        if self.eval_resize not in RESIZE_MODES:
            raise ValueError(f"DataConfig.eval_resize={self.eval_resize!r}: use one of "
                             f"{', '.join(RESIZE_MODES)}")
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"DataConfig.hw_decoder_load {self.hw_decoder_load} is not a "
                             "fraction: use [0, 1] (DALI's default 0.65)")
        if not 0 <= self.bad_sample_warn_fraction <= 1:
            raise ValueError(f"DataConfig.bad_sample_warn_fraction "
                             f"{self.bad_sample_warn_fraction} is not a fraction: use [0, 1]")
        if self.resolution < 8:
            raise ValueError(f"DataConfig.resolution {self.resolution} is too small: use >= 8")
        if self.caption_length < 4:
            raise ValueError(f"DataConfig.caption_length {self.caption_length} leaves no room "
                             "for BOS, one piece, EOS and the appended PAD: use >= 4 "
                             "(reference: 128)")
        _check_range("crop_scale", self.crop_scale, upper=1.0)
        _check_range("crop_ratio", self.crop_ratio, upper=None)
        if not 0 <= self.color_jitter <= MAX_COLOR_JITTER:
            raise ValueError(f"DataConfig.color_jitter {self.color_jitter} is outside "
                             f"[0, {MAX_COLOR_JITTER}]: above it the contrast and saturation "
                             "factors 1 - 0.8 * strength turn negative; use 0.4 (official) or "
                             "0 to disable")
        for name in ("color_jitter_probability", "grayscale_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"DataConfig.{name} {getattr(self, name)} is not a "
                                 "probability: use a value in [0, 1]")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"DataConfig.{name} has {len(values)} values: give one per "
                                 "RGB channel (3)")
        if min(self.std) <= 0:
            raise ValueError(f"DataConfig.std {self.std} has a non-positive entry: use > 0")
        check_minimums("data", self, _MINIMUMS, label="DataConfig")

    def resolve_shards(self, spec: str | list | None = None) -> list[str]:
        """Concrete shard paths of `spec` (default: train_shards; a mixture's sources one after
        the other, unweighted), each checked to be a readable tar. Raises FileNotFoundError /
        ValueError naming the shard and the fix."""
        spec = self.train_shards if spec is None else spec
        return resolve_shard_spec(spec)


# Integer fields and their smallest legal value, with what each counts (for the message).
_MINIMUMS = {
    "num_threads": (1, "DALI CPU worker threads per rank"),
    "prefetch": (1, "batches DALI prepares ahead"),
    "shuffle_buffer": (1, "samples in the reader's shuffle buffer"),
    "max_image_pixels": (1, "largest image a header may declare"),
    "max_caption_bytes": (1, "longest caption read, in UTF-8 bytes"),
    "bad_sample_window": (1, "samples per bad-data window"),
    "seed": (0, "base seed of shuffling and augmentation"),
    "decoder_size_hint": (0, "hardware decoder buffer side, 0 for none"),
}


def _check_range(name: str, value: tuple[float, float], upper: float | None) -> None:
    lo, hi = value
    if not (0 < lo <= hi) or (upper is not None and hi > upper):
        bound = f"0 < low <= high <= {upper}" if upper is not None else "0 < low <= high"
        raise ValueError(f"DataConfig.{name} {tuple(value)} is invalid: need {bound}")


def every_letter_case(extensions: tuple[str, ...]) -> tuple[str, ...]:
    """Each extension in every spelling of its letters' case (jpg: jpg, jpG, ..., JPG), in
    order: DALI's webdataset reader matches `ext` exactly, and cameras write .JPG."""
    spellings: dict[str, None] = {}
    for ext in extensions:
        for cases in itertools.product(*[(c.lower(), c.upper()) for c in ext]):
            spellings["".join(cases)] = None
    return tuple(spellings)


def index_path_for(shard: str) -> str:
    """DALI index file that belongs to `shard` (the naming `wds2idx` uses: X.tar -> X.idx)."""
    return shard[: -len(".tar")] + ".idx" if shard.endswith(".tar") else shard + ".idx"


def find_index_paths(shards: list[str]) -> list[str] | None:
    """Index files for all shards, or None when any is missing (DALI needs all or none;
    without them it scans every tar at start-up, which is slower but correct)."""
    paths = [index_path_for(s) for s in shards]
    if all(os.path.isfile(p) and os.path.getsize(p) > 0 for p in paths):
        return paths
    return None


def shards_digest(shards: list[str]) -> str:
    """Short digest of the ordered shard names, stored in loader state to detect a changed set.
    Base names only, so a dataset moved to another mount point still resumes."""
    joined = "\n".join(os.path.basename(s) for s in shards)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


__all__ = ["DataConfig", "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD",
           "MAX_COLOR_JITTER", "resolve_shard_spec", "resolve_plain_spec", "check_shard",
           "index_path_for", "find_index_paths", "shards_digest"]
