"""Images/s of the DALI loader against the loader a user would otherwise write, side by side,
and what the official colour augmentation costs on top.

    python tools/bench_data.py --shards DIR [--resolution R] [--threads T]

All loaders read the same shards and produce a training batch of random-resized-crop images
at R x R, normalised float32 CHW, plus fixed-length caption tokens.
  * dali: ov2_megatron.data.ImageCaptionLoader with T DALI threads (decoding "mixed", i.e. on
    the GPU, when CUDA is available; "cpu" otherwise) and DataConfig's colour augmentation
    (the official SimCLR jitter 0.4 with p 0.8, grayscale p 0.2; color_jitter.py).
  * dali, no colour ops: the same with color_jitter=0, grayscale_probability=0.
  * torch: a torch DataLoader with T worker processes over an IterableDataset that reads the
    tars with `tarfile`, decodes with PIL and applies torchvision's transforms. torchvision
    itself cannot be installed next to this project's pinned CPU torch, so the three transforms
    are re-implemented here with torchvision's exact algorithms: RandomResizedCrop (its
    get_params: 10 attempts at area/log-ratio sampling, then the centre-crop fallback; PIL crop
    + bilinear resize, which is what torchvision does on PIL images), ToTensor (uint8 HWC ->
    float CHW / 255) and Normalize. Captions are tokenized in the workers' collate_fn.
The torch baseline has no colour ops, so it is compared with the second DALI loader (like
for like). Each loader gets warm-up batches (worker/pipeline start-up is excluded), then a timed
run; the loaders alternate for --rounds rounds and each one's best round is reported, so none
is penalised by a noisy neighbour. Images per CPU-second (this process's threads plus its worker
processes) are printed too: unlike images/s they hold on a shared, loaded machine. The last two
lines are `colour augmentation cost: X.XXx images/s (with / without)` and
`speedup vs torch DataLoader: X.XXx` (wall-clock images/s, no colour ops in either).

    python tools/bench_data.py --make-photos DIR --photo-size 500x375 [--count N] [--quality Q]

writes N photo-like JPEGs (smooth colour fields, edges and sensor-like noise: JPEG sizes close
to real photos at the same quality, unlike flat synthetic shapes) into shards under DIR, for
the decode tables of docs/benchmarks/ (e.g. original size vs a stage-1 copy).

    python tools/bench_data.py --scale 200x500,800x500 [--streams 1,8] [--scale-dir DIR]

measures one rank's loader memory, start-up and shard-file opens against the dataset's size,
for 1 and 8 data streams (perf/loader_scale.py; docs/benchmarks/ has the table);
`--shuffle-buffers 64,8192` measures the memory per shuffle-buffer sample instead.

    python tools/bench_data.py --startup 2000,20000 [--startup-dir DIR]

measures instead what one rank's loader start-up costs for N shard paths (tiny one-sample
img2dataset-style shards without index files, made once under DIR): listing and checking the
shards, making the missing DALI index files (first run) or finding them (later runs), and
building the DALI pipeline up to its first batch, each with wall time and resident-memory
growth. One line per N and phase (docs/benchmarks/2026-12-02-shard-startup.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import math
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

from ov2_megatron.data.config import DataConfig, resolve_shard_spec  # noqa: E402
from ov2_megatron.data.dali_pipeline import ImageCaptionLoader  # noqa: E402
from ov2_megatron.data.image_decode import to_rgb  # noqa: E402
from ov2_megatron.data.shards import iter_shard  # noqa: E402
from ov2_megatron.data.tokenizer import CaptionTokenizer, train_tokenizer  # noqa: E402


def random_resized_crop_params(width: int, height: int, scale, ratio, rng: random.Random):
    """torchvision.transforms.RandomResizedCrop.get_params: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TorchBaselineDataset(IterableDataset):
    """tarfile + PIL + torchvision-equivalent transforms; samples split over workers."""

    def __init__(self, shards: list[str], config: DataConfig):
        self.shards, self.config = shards, config
        self.mean = torch.tensor(config.mean).view(3, 1, 1)
        self.std = torch.tensor(config.std).view(3, 1, 1)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.config.seed * 1000 + worker)
        index = 0
        while True:  # endless, like the training stream it is compared with
            for shard in self.shards:
                for sample in iter_shard(shard):
                    index += 1
                    if index % workers == worker:
                        yield self.transform(sample.jpeg, rng), sample.caption

    def transform(self, jpeg: bytes, rng: random.Random) -> torch.Tensor:
        size = self.config.resolution
        image = to_rgb(Image.open(io.BytesIO(jpeg)))  # upright, as DALI decodes it
        top, left, h, w = random_resized_crop_params(*image.size, self.config.crop_scale,
                                                     self.config.crop_ratio, rng)
        image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image, copy=True))  # [R, R, 3] uint8
        tensor = pixels.permute(2, 0, 1).contiguous().float().div(255)  # ToTensor: [3, R, R]
        return tensor.sub_(self.mean).div_(self.std)  # Normalize


class TokenizingCollate:
    def __init__(self, tokenizer_path: str, length: int):
        self.tokenizer_path, self.length, self.tokenizer = tokenizer_path, length, None

    def __call__(self, items):
        if self.tokenizer is None:
            self.tokenizer = CaptionTokenizer.from_file(self.tokenizer_path)
        images = torch.stack([image for image, _ in items])
        tokens = self.tokenizer.encode_batch([caption for _, caption in items], self.length)
        return {"images": images, "tokens": torch.from_numpy(tokens).long()}


def cpu_seconds() -> float:
    """CPU time of this process (all DALI threads) plus its live children (DataLoader workers)."""
    me = psutil.Process()
    times = [me.cpu_times()] + [child.cpu_times() for child in me.children(recursive=True)]
    return sum(t.user + t.system for t in times)


def timed(batches, warmup: int, count: int, batch_size: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over `count` batches after `warmup`.
    The second is what a loaded machine cannot distort: it says how much CPU each image costs."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        next(batches)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(count):
        batch = next(batches)
        if cuda:
            batch["images"] = batch["images"].cuda(non_blocking=True)
    if cuda:
        torch.cuda.synchronize()
    images = count * batch_size
    return (images / (time.perf_counter() - start),
            images / max(cpu_seconds() - cpu_start, 1e-9))


def find_tokenizer(shards_dir: str, shards: list[str], tmp: str) -> str:
    for folder in (shards_dir, os.path.dirname(os.path.abspath(shards_dir))):
        found = sorted(glob.glob(os.path.join(folder, "*.model")))
        if found:
            return found[0]
    captions = (s.caption for shard in shards for s in iter_shard(shard, with_images=False))
    return train_tokenizer(captions, os.path.join(tmp, "bench_tok"), 1000, max_sentences=20000)


def make_tiny_shards(root: str, count: int) -> None:
    """`count` one-sample shards (a 16 x 16 JPEG and a caption), no index files."""
    import tarfile

    from PIL import Image

    os.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    for i in range(count):
        path = os.path.join(root, f"{i:06d}.tar")
        if os.path.exists(path):
            continue
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for ext, payload in (("jpg", jpeg), ("txt", f"sample {i} tiny".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """Low-frequency colour field + a few hard-edged shapes + per-pixel noise, as JPEG."""
    from PIL import ImageDraw

    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(width // 20, width // 5))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in
                                                              rng.integers(0, 256, 3)))
    pixels = np.asarray(field, dtype=np.int16) + rng.normal(0, 6, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                   quality=quality)
    return buf.getvalue()


def make_photo_shards(root: str, count: int, width: int, height: int, quality: int) -> None:
    from ov2_megatron.data.shards import Sample, ShardWriter

    rng = np.random.default_rng(0)
    writer = ShardWriter(root, samples_per_shard=256)
    for i in range(count):
        writer.write(Sample(f"{i:06d}", photo_like_jpeg(rng, width, height, quality),
                            f"a photo number {i} with {i % 7} round shapes"))
    paths = writer.close()
    size = sum(os.path.getsize(p) for p in paths) / count / 1024
    print(f"{count} photo-like {width}x{height} JPEGs (quality {quality}, {size:.0f} KB each "
          f"with the tar overhead) in {len(paths)} shards under {root}")


def startup_benchmark(counts: list[int], root: str) -> None:
    """Per N: wall seconds and RSS growth of listing, indexing (cold, warm) and first batch."""
    import psutil

    from ov2_megatron.data.shard_index import ensure_indexes

    process = psutil.Process()
    tokenizer = train_tokenizer([f"sample {i} tiny" for i in range(100)],
                                os.path.join(root, "tok"), 64)

    def phase(n: int, name: str, fn):
        rss, start = process.memory_info().rss, time.perf_counter()
        result = fn()
        print(f"shards {n}: {name}: {time.perf_counter() - start:.2f} s, "
              f"RSS +{(process.memory_info().rss - rss) / 2**20:.0f} MiB", flush=True)
        return result

    for n in counts:
        folder = os.path.join(root, f"n{n}")
        make_tiny_shards(folder, n)
        for stale in glob.glob(os.path.join(folder, "*.idx")):
            os.remove(stale)  # cold start: as img2dataset leaves them
        shards = phase(n, "list + check", lambda: resolve_shard_spec(folder))
        phase(n, "index (make)", lambda: ensure_indexes(shards))
        phase(n, "index (found)", lambda: ensure_indexes(shards))
        config = DataConfig(train_shards=folder, tokenizer_model=tokenizer, resolution=16,
                            num_threads=1, shuffle_buffer=64, color_jitter=0.0,
                            grayscale_probability=0.0)
        loader = phase(n, "loader + first batch", lambda: next(ImageCaptionLoader(
            config, dp_rank=0, dp_size=1, batch_size=32, device="cpu")) and None)
        del loader
        print(f"shards {n}: process RSS {process.memory_info().rss / 2**20:.0f} MiB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard directory (or glob/comma list)")
    parser.add_argument("--startup", default="",
                        help="comma list of shard counts: measure loader start-up instead")
    parser.add_argument("--startup-dir", default=os.path.join(tempfile.gettempdir(),
                                                               "ov2-startup-bench"))
    parser.add_argument("--scale", default="",
                        help="comma list of SHARDSxSAMPLES: measure one rank's loader memory, "
                        "start-up and file opens against dataset size (perf/loader_scale.py)")
    parser.add_argument("--streams", default="1,8", help="--scale: data streams (DP ranks)")
    parser.add_argument("--shuffle-buffers", default="",
                        help="comma list: measure RSS per shuffle-buffer sample instead, on noise "
                        "images of --noise-sides px (perf/loader_scale.py)")
    parser.add_argument("--noise-sides", default="64,128")
    parser.add_argument("--dont-use-mmap", action="store_true",
                        help="--shuffle-buffers: with data.dont_use_mmap (plain reads)")
    parser.add_argument("--scale-dir", default=os.path.join(tempfile.gettempdir(),
                                                             "ov2-scale-bench"))
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="DALI threads = DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: a "
                        "*.model next to the shards, else one trained on their captions)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="DALI decoding: gpu = mixed (nvJPEG + hardware decoder)")
    parser.add_argument("--hw-decoder-load", type=float, default=DataConfig.hw_decoder_load,
                        help="share of JPEGs for the GPU's hardware decoder (data.hw_decoder_load)")
    parser.add_argument("--dali-only", action="store_true",
                        help="skip the torch DataLoader baseline (e.g. GPU decoding alone)")
    parser.add_argument("--make-photos", metavar="DIR", help="write photo-like shards and stop")
    parser.add_argument("--photo-size", default="500x375", help="WIDTHxHEIGHT of --make-photos")
    parser.add_argument("--count", type=int, default=1024, help="--make-photos: images")
    parser.add_argument("--quality", type=int, default=90, help="--make-photos: JPEG quality")
    args = parser.parse_args(argv)
    if args.make_photos:
        width, height = (int(v) for v in args.photo_size.lower().split("x"))
        make_photo_shards(args.make_photos, args.count, width, height, args.quality)
        return 0
    if args.shuffle_buffers:
        from ov2_megatron.perf.loader_scale import buffer_benchmark

        buffer_benchmark([int(b) for b in args.shuffle_buffers.split(",")],
                         [int(n) for n in args.noise_sides.split(",")], args.scale_dir,
                         args.dont_use_mmap)
        return 0
    if args.scale:
        from ov2_megatron.perf.loader_scale import scale_benchmark

        sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.scale.split(",")]
        scale_benchmark(sizes, [int(n) for n in args.streams.split(",")], args.scale_dir)
        return 0
    if args.startup:
        startup_benchmark([int(n) for n in args.startup.split(",")], args.startup_dir)
        return 0
    if not args.shards:
        parser.error("--shards is required (or --startup N)")
    if args.threads < 1 or args.batches < 1 or args.rounds < 1:
        parser.error("--threads, --batches and --rounds must be >= 1")
    shards = resolve_shard_spec(args.shards)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer or find_tokenizer(args.shards, shards, tmp)
        config = DataConfig(train_shards=args.shards, tokenizer_model=tokenizer,
                            resolution=args.resolution, num_threads=args.threads,
                            hw_decoder_load=args.hw_decoder_load)
        config.validate()
        plain = dataclasses.replace(config, color_jitter=0.0, grayscale_probability=0.0)
        best = {"dali": (0.0, 0.0), "plain": (0.0, 0.0), "torch": (0.0, 0.0)}
        decoding = reason = "?"
        for _ in range(args.rounds):
            for name, loader_config in (("dali", config), ("plain", plain)):
                loader = ImageCaptionLoader(loader_config, dp_rank=0, dp_size=1,
                                            batch_size=args.batch_size, device=args.device)
                decoding, reason = ("mixed (GPU)" if loader.device == "gpu" else "cpu",
                                    loader.decoding)
                best[name] = max(best[name], timed(iter(loader), args.warmup, args.batches,
                                                   args.batch_size))
                del loader
            if args.dali_only:
                continue
            baseline = DataLoader(TorchBaselineDataset(shards, config), batch_size=args.batch_size,
                                  num_workers=args.threads, prefetch_factor=2,
                                  collate_fn=TokenizingCollate(tokenizer, config.caption_length),
                                  pin_memory=torch.cuda.is_available())
            batches = iter(baseline)
            best["torch"] = max(best["torch"], timed(batches, args.warmup, args.batches,
                                                     args.batch_size))
            del batches  # stops the workers before the next round's DALI run
    print(f"shards: {len(shards)}, resolution: {args.resolution}, batch: {args.batch_size}, "
          f"threads/workers: {args.threads}, timed batches: {args.batches} x {args.rounds} rounds")
    (dali, dali_cpu), (plain_rate, plain_cpu), (base, base_cpu) = (
        best["dali"], best["plain"], best["torch"])
    colour = (f"colour jitter {config.color_jitter} p {config.color_jitter_probability}, "
              f"grayscale p {config.grayscale_probability}")
    print(f"data: {reason}")
    print(f"dali ({decoding} decoding, {colour}): {dali:.1f} images/s "
          f"({dali_cpu:.0f} per CPU-second)")
    print(f"dali ({decoding} decoding, no colour ops): {plain_rate:.1f} images/s "
          f"({plain_cpu:.0f} per CPU-second)")
    if args.dali_only:
        return 0
    print(f"torch DataLoader (PIL, {args.threads} workers, no colour ops): {base:.1f} images/s "
          f"({base_cpu:.0f} per CPU-second)")
    print(f"CPU efficiency vs torch DataLoader: {plain_cpu / base_cpu:.2f}x")
    print(f"colour augmentation cost: {dali / plain_rate:.2f}x images/s (with / without), "
          f"{dali_cpu / plain_cpu:.2f}x per CPU-second")
    print(f"speedup vs torch DataLoader: {plain_rate / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
