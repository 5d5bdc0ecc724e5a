"""What makes a sample bad, checked two ways.

`check_encoded_image` (JPEG, PNG, WebP: what img2dataset writes) and `check_caption` are
header-level checks cheap enough to run on every sample inside the DALI pipeline (a few dozen
byte reads, no decode): they catch the failures that would otherwise abort a DALI decode and
with it the whole batch; a JPEG's scan data gets one numpy pass over its bytes
(`check_jpeg_scans`), since decoders only warn about broken scans. `inspect_image` fully
decodes with PIL and is what tools/prepare_shards.py runs once per image when shards are made.
"""

from __future__ import annotations

import enum
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ov2_megatron.data.image_decode import to_rgb


class Issue(enum.IntEnum):
    """Why a sample was skipped or replaced. Values travel through DALI as int32."""

    OK = 0
    EMPTY_IMAGE = 1            # zero-byte image entry, or no image entry for the key
    UNSUPPORTED_IMAGE = 2      # not JPEG, PNG or WebP (e.g. GIF, TIFF, HTML error page)
    TRUNCATED_IMAGE = 3        # JPEG without EOI after its last scan, PNG without IEND, short WebP
    CORRUPT_IMAGE = 4          # header structure broken before the image size
    OVERSIZED_IMAGE = 5        # header declares more than max_image_pixels
    NO_CAPTION = 6             # missing .txt entry, or a caption of only whitespace
    CAPTION_NOT_UTF8 = 7
    UNDECODABLE = 8            # passed the header checks but the decoder failed on it
    CAPTION_FIELD_MISSING = 9  # data.caption_key set, but the .json lacks it or is not JSON
    CAPTION_TOO_LONG = 10      # more than data.max_caption_bytes: skipped before tokenizing
    CORRUPT_SCAN = 11          # JPEG headers fine, entropy-coded data broken (check_jpeg_scans)

    @property
    def metric_name(self) -> str:
        return self.name.lower()


# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field


def check_encoded_jpeg(data: np.ndarray | bytes, max_pixels: int) -> Issue:
    """Header-level validity of an encoded JPEG (uint8 array or bytes), without decoding."""
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    n = len(buf)
    if n == 0:
        return Issue.EMPTY_IMAGE
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8 or buf[2] != 0xFF:
        return Issue.UNSUPPORTED_IMAGE
    pos = 2
    while True:  # walk marker segments up to the frame header (SOF)
        if pos + 4 > n:
            return Issue.TRUNCATED_IMAGE
        if buf[pos] != 0xFF:
            return Issue.CORRUPT_IMAGE
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return Issue.CORRUPT_IMAGE
        seg_len = (buf[pos + 2] << 8) | buf[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 9 > n:
                return Issue.TRUNCATED_IMAGE
            height = (buf[pos + 5] << 8) | buf[pos + 6]
            width = (buf[pos + 7] << 8) | buf[pos + 8]
            if height == 0 or width == 0:
                return Issue.CORRUPT_IMAGE
            if height * width > max_pixels:
                return Issue.OVERSIZED_IMAGE
            break
        if seg_len < 2:
            return Issue.CORRUPT_IMAGE
        pos += 2 + seg_len
    if not _has_end_after_last_scan(buf):
        return Issue.TRUNCATED_IMAGE
    return check_jpeg_scans(buf)


# Markers that may sit between the scans of a (progressive) JPEG: DHT, DAC, DQT, DNL, DRI,
# SOS, APPn, COM. Anything else inside the scan region (a frame header, SOI, reserved codes)
# means the entropy-coded data is broken.
_BETWEEN_SCANS = frozenset({0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xDA, 0xFE} | set(range(0xE0, 0xF0)))
_RST0, _EOI, _SOS, _DRI = 0xD0, 0xD9, 0xDA, 0xDD


def check_jpeg_scans(data: np.ndarray | bytes | memoryview) -> Issue:
    """Byte-level validity of a JPEG's entropy-coded data, without Huffman decoding.

    Inside a scan every 0xFF byte is stuffed (FF 00) or a restart marker, and restart markers
    come only with a restart interval (DRI) and in the cyclic order RST0..RST7. Corrupt scan
    data breaks that (an FF followed by a code no scan may hold, a restart out of order or
    where none is defined), and libjpeg-turbo, DALI's CPU decoder and PIL's, then only warns
    ("Corrupt JPEG data: ...") and decodes grey or shifted blocks that would be trained on.
    Numpy over the bytes, no decode: 0.15-0.2 ms for a 60-230 KB JPEG (measured on noise, the
    worst case: ~1 ms per MB), against several ms to decode it. Corruption that keeps the byte
    stuffing valid (a flipped bit inside a Huffman code) is only visible to a full decode."""
    a = np.frombuffer(data, dtype=np.uint8)
    ff = np.flatnonzero(a[:-1] == 0xFF)
    codes = a[ff + 1]
    markers = (codes != 0x00) & (codes != 0xFF)  # a marker or RST, not stuffing or fill
    ff, codes = ff[markers], codes[markers]
    is_rst = (codes >= _RST0) & (codes <= _RST0 + 7)
    interval, pos, n = 0, 2, len(a)
    while pos + 4 <= n:  # walk the segments: headers, then scan by scan
        if a[pos] != 0xFF:
            # Segment lengths past the frame header that do not chain up: not a verdict on
            # the scan data, so the decoder judges it (and the loader's recovery, if it fails).
            return Issue.OK
        marker = int(a[pos + 1])
        if marker == 0xFF or marker in _STANDALONE_MARKERS:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == _EOI:
            return Issue.OK
        length = (int(a[pos + 2]) << 8) | int(a[pos + 3])
        if marker == _DRI and length >= 4 and pos + 6 <= n:
            interval = (int(a[pos + 4]) << 8) | int(a[pos + 5])
        pos += 2 + length
        if marker != _SOS:
            continue
        # Entropy-coded data runs from `pos` to the next marker that is not a restart.
        i = int(np.searchsorted(ff, pos))
        end = i
        while end < len(ff) and is_rst[end]:
            end += 1
        restarts = codes[i:end] - _RST0
        if len(restarts) and (not interval or np.any(restarts != np.arange(len(restarts)) % 8)):
            return Issue.CORRUPT_SCAN
        if end == len(ff):
            return Issue.TRUNCATED_IMAGE
        next_marker = int(codes[end])
        if next_marker != _EOI and next_marker not in _BETWEEN_SCANS:
            return Issue.CORRUPT_SCAN
        pos = int(ff[end])
    return Issue.OK  # the lengths ran off the end: as above, the decoder judges it


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC


def check_encoded_image(data: np.ndarray | bytes, max_pixels: int) -> Issue:
    """Header-level validity of an encoded JPEG, PNG or WebP, chosen by its magic bytes (not
    the entry's extension: img2dataset and friends name files by requested, not real, format)."""
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    head = buf[:16].tobytes()
    if head.startswith(_PNG_SIGNATURE):
        return _check_png(buf, max_pixels)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _check_webp(buf, max_pixels)
    return check_encoded_jpeg(buf, max_pixels)


def _check_png(buf: memoryview, max_pixels: int) -> Issue:
    # Signature, then IHDR first: length 13, "IHDR", width and height as big-endian u32.
    if len(buf) < 33 or buf[12:16].tobytes() != b"IHDR":
        return Issue.CORRUPT_IMAGE if len(buf) >= 33 else Issue.TRUNCATED_IMAGE
    width = int.from_bytes(buf[16:20], "big")
    height = int.from_bytes(buf[20:24], "big")
    if width == 0 or height == 0:
        return Issue.CORRUPT_IMAGE
    if width * height > max_pixels:
        return Issue.OVERSIZED_IMAGE
    # A cut file loses its IEND; trailing junk after IEND is rare and decoders accept it.
    tail = buf[-len(_PNG_END):].tobytes()
    if tail == _PNG_END or b"IEND" in buf[-4096:].tobytes():
        return Issue.OK
    return Issue.TRUNCATED_IMAGE


def _check_webp(buf: memoryview, max_pixels: int) -> Issue:
    # RIFF size (u32 LE at 4) counts the bytes after the first 8: a cut file is shorter.
    if len(buf) < 30:
        return Issue.TRUNCATED_IMAGE
    if int.from_bytes(buf[4:8], "little") + 8 > len(buf):
        return Issue.TRUNCATED_IMAGE
    chunk = buf[12:16].tobytes()
    if chunk == b"VP8 ":  # lossy: 3-byte frame tag, start code, 14-bit width and height
        if buf[23:26].tobytes() != b"\x9d\x01\x2a":
            return Issue.CORRUPT_IMAGE
        width = int.from_bytes(buf[26:28], "little") & 0x3FFF
        height = int.from_bytes(buf[28:30], "little") & 0x3FFF
    elif chunk == b"VP8L":  # lossless: signature 0x2f, then 14-bit width-1 and height-1
        if buf[20] != 0x2F:
            return Issue.CORRUPT_IMAGE
        bits = int.from_bytes(buf[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
        width = int.from_bytes(buf[24:27], "little") + 1
        height = int.from_bytes(buf[27:30], "little") + 1
    else:
        return Issue.CORRUPT_IMAGE
    if width == 0 or height == 0:
        return Issue.CORRUPT_IMAGE
    return Issue.OVERSIZED_IMAGE if width * height > max_pixels else Issue.OK


def _has_end_after_last_scan(buf: memoryview) -> bool:
    """True when an EOI marker follows the last SOS. Inside entropy-coded data 0xFF is always
    stuffed (FF 00) or a RST marker, so FF D9 / FF DA there are real markers; a file cut
    anywhere after its header loses the EOI that must follow its last scan."""
    if buf[-2] == 0xFF and buf[-1] == 0xD9:  # the common case: nothing after EOI
        return True
    raw = buf.tobytes()  # rare path (trailing bytes after EOI, or truncation): one copy
    return raw.rfind(b"\xff\xd9") > raw.rfind(b"\xff\xda") >= 0


def check_caption(data: np.ndarray | bytes) -> tuple[Issue, str]:
    """(issue, text) for an encoded caption: UTF-8 with at least one non-space character. A
    leading byte-order mark (Windows editors write one) is dropped: U+FEFF is no whitespace to
    str.split, so it would stay in the caption and reach the tokenizer."""
    raw = bytes(data)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return Issue.CAPTION_NOT_UTF8, ""
    text = " ".join(text.split())  # newlines/tabs inside a caption become single spaces
    if not text:
        return Issue.NO_CAPTION, ""
    return Issue.OK, text


def inspect_image(data: bytes, max_pixels: int, jpeg_quality: int = 95) -> tuple[bytes | None, str]:
    """Decode once with PIL. Returns (jpeg_bytes, "") for a usable image, where a JPEG that
    passes `check_encoded_jpeg` is kept byte for byte and anything else (PNG, WebP, CMYK JPEG,
    JPEG with junk after EOI) is re-encoded; or (None, reason) for one to skip."""
    if not data:
        return None, "empty_file"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return None, "not_an_image"
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            return None, "oversized"
        except OSError as err:
            return None, _os_error_reason(err)
        if image.width * image.height > max_pixels:
            return None, "oversized"
        try:
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            return None, "oversized"
        except OSError as err:
            return None, _os_error_reason(err)
        except (ValueError, SyntaxError) as err:  # PIL plugins raise these on broken headers
            return None, f"corrupt: {err}"
    keep_bytes = image.format == "JPEG" and image.mode in ("RGB", "L")
    issue = check_encoded_jpeg(data, max_pixels) if image.format == "JPEG" else Issue.OK
    if issue == Issue.CORRUPT_SCAN:  # PIL decoded it, with grey or shifted blocks
        return None, "corrupt: broken JPEG scan data"
    if keep_bytes and issue == Issue.OK:
        return data, ""
    # A kept JPEG keeps its EXIF orientation tag (DALI applies it when training); a re-encoded
    # image is made upright first, since the new JPEG carries no tag.
    out = io.BytesIO()
    to_rgb(image).save(out, format="JPEG", quality=jpeg_quality)
    return out.getvalue(), ""


def _os_error_reason(err: OSError) -> str:
    # PIL reports a cut file as "image file is truncated" or "Truncated File Read".
    return "truncated" if "truncated" in str(err).lower() else f"corrupt: {err}"


__all__ = ["Issue", "check_encoded_image", "check_encoded_jpeg", "check_jpeg_scans",
           "check_caption", "inspect_image"]
