"""The Python stage between DALI's webdataset reader and its image decoder.

DALI aborts a whole batch (and an iterator with it) when one image fails to decode, and it
has no per-sample skip. So before decoding, `SampleFilter` runs once per batch
(`fn.python_function(batch_processing=True)`) and:
  * checks each encoded image (JPEG, PNG or WebP) and caption at header level (sample_checks),
    swapping a bad image for a tiny valid placeholder JPEG so the decoder never sees it;
  * takes the caption from `.txt` or from the `.json` field `caption_key` (captions.py),
    picking one of several candidates with the per-sample uniform draw DALI passes in;
  * reports an `Issue` code per sample, which the loader uses to replace the row and count it,
    and for a bad sample its source ("shard.tar:offset:name", DALI's source_info), so an
    error can name the shard;
  * tokenizes the captions into fixed-length rows, so tokens leave DALI as a dense tensor.
Its output depends only on its input (and the blocklist), so DALI checkpoints stay exact.

A caption longer than data.max_caption_bytes is flagged (caption_too_long) before it is
split or tokenized. A JPEG whose scan data breaks the byte stuffing is flagged too
(corrupt_scan: sample_checks.check_jpeg_scans): decoders only warn about it.

Images that pass the header checks but still break the decoder (e.g. corrupt entropy data)
are handled by the loader's recovery: it replays the stream from the last checkpoint with
`capture_batches` set (DALI reports a failure of any in-flight batch, so the culprit can be
up to `prefetch` batches ahead), finds the culprit by decoding the captured images one by
one, and adds its fingerprint to `blocklist`; from then on this stage replaces it.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from ov2_megatron.data.captions import pick_caption
from ov2_megatron.data.sample_checks import Issue, check_encoded_image
from ov2_megatron.data.tokenizer import CaptionTokenizer


# A .json entry may be this many times data.max_caption_bytes before it is skipped unparsed.
_JSON_SLACK = 64


def _placeholder_jpeg() -> np.ndarray:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="JPEG", quality=90)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def fingerprint(data: np.ndarray | bytes) -> str:
    """Content hash of an encoded image, used to blocklist decoder failures."""
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


class SampleFilter:
    """Callable for fn.python_function:
    (images, texts, metas, draws, image_sources, text_sources, meta_sources)
        -> (images, tokens, issues, captions, bad_sources)."""

    def __init__(self, tokenizer: CaptionTokenizer, caption_length: int, max_image_pixels: int,
                 caption_key: str = "", sample_candidates: bool = True,
                 max_caption_bytes: int = 8192):
        self.tokenizer = tokenizer
        self.max_caption_bytes = max_caption_bytes
        self.caption_key = caption_key
        self.sample_candidates = sample_candidates  # False (eval): always the first candidate
        self.caption_length = caption_length
        self.max_image_pixels = max_image_pixels
        self.placeholder = _placeholder_jpeg()
        self.blocklist: dict[int, set[str]] = {}  # encoded length -> fingerprints
        self.capture_batches = 0  # > 0: keep copies of the next N batches' encoded images
        self.captured: list[bytes] = []

    def block(self, data: bytes) -> None:
        self.blocklist.setdefault(len(data), set()).add(fingerprint(data))

    def blocked(self) -> list[tuple[int, str]]:
        return sorted((n, h) for n, hashes in self.blocklist.items() for h in hashes)

    def restore_blocklist(self, entries: list[tuple[int, str]]) -> None:
        self.blocklist = {}
        for length, digest in entries:
            self.blocklist.setdefault(int(length), set()).add(digest)

    def _is_blocked(self, data: np.ndarray) -> bool:
        # Hash only when the length matches a blocked image: the common path costs a dict lookup.
        hashes = self.blocklist.get(len(data))
        return bool(hashes) and fingerprint(data) in hashes

    def _caption(self, caption: np.ndarray, meta: np.ndarray, draw) -> tuple[Issue, str]:
        """The caption, or CAPTION_TOO_LONG before anything reads a runaway entry: splitting
        and tokenizing a 10 MB caption takes seconds, once per batch that holds it."""
        limit = self.max_caption_bytes
        raw = meta if self.caption_key else caption
        # A .json may carry other fields beside the caption: it gets a larger bound here and
        # the picked caption the exact one below.
        if len(raw) > (_JSON_SLACK * limit if self.caption_key else limit):
            return Issue.CAPTION_TOO_LONG, ""
        issue, text = pick_caption(caption, meta, self.caption_key,
                                   float(draw) if self.sample_candidates else None)
        if issue == Issue.OK and len(text) > limit // 4 and len(text.encode("utf-8")) > limit:
            return Issue.CAPTION_TOO_LONG, ""
        return issue, text

    def check(self, image, caption, meta, draw: float | None) -> tuple[Issue, str]:
        """(issue, caption text) of one sample's encoded image, .txt and .json entries: what
        the loader keeps or skips (also --dry-run's shard probe, data/shard_probe.py)."""
        issue = check_encoded_image(image, self.max_image_pixels)
        if issue == Issue.OK and self.blocklist and self._is_blocked(image):
            issue = Issue.UNDECODABLE
        caption_issue, text = self._caption(caption, meta, draw)
        return (caption_issue if issue == Issue.OK else issue), text

    def __call__(self, jpegs: list[np.ndarray], captions: list[np.ndarray],
                 metas: list[np.ndarray], draws: list[np.ndarray],
                 image_sources: list[np.ndarray], text_sources: list[np.ndarray],
                 meta_sources: list[np.ndarray]):
        out_jpegs, issues, texts, raw_captions, bad_sources = [], [], [], [], []
        for jpeg, caption, meta, draw, *entry_sources in zip(
                jpegs, captions, metas, draws, image_sources, text_sources, meta_sources,
                strict=True):
            issue, text = self.check(jpeg, caption, meta, draw)
            # The decoder must see valid data even for a rejected row; the loader drops it later.
            out_jpegs.append(jpeg if issue == Issue.OK else self.placeholder)
            issues.append(np.array(int(issue), dtype=np.int32))
            texts.append(text)
            raw_captions.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
            # A missing entry has no source of its own: the first present one names the sample
            # (the image, else its .txt, else its .json, img2dataset's caption carrier).
            none = np.zeros(0, dtype=np.uint8)
            source = next((s for s in entry_sources if len(s)), none)
            bad_sources.append(source if issue != Issue.OK else none)
        if self.capture_batches > 0:
            self.captured += [bytes(j) for j, i in zip(jpegs, issues, strict=True)
                              if int(i) == Issue.OK]
            self.capture_batches -= 1
        tokens = self.tokenizer.encode_batch(texts, self.caption_length)  # [B, L] int32
        return out_jpegs, list(tokens), issues, raw_captions, bad_sources


__all__ = ["SampleFilter", "fingerprint"]
