"""How one rank's loader grows with the dataset and with the number of data streams (#24).

    python tools/bench_data.py --scale 200x500,800x500 --streams 1,8 [--scale-dir DIR]

For each dataset size (SHARDS x SAMPLES of tiny samples: a 16 x 16 JPEG and a caption, each
shard with its DALI index, written once under DIR) and each stream count, one fresh process
builds the last stream's ImageCaptionLoader, as training builds it, and takes its first
batch, under `strace -f`. Reported per rank:
  RSS        resident memory after the first batch minus after the imports and the tokenizer
             (the loader's own: DALI's sample table, its index parsing, buffers, memory maps)
  B/sample   the RSS growth between the two dataset sizes over the samples added: the slope
             of the growth law, free of the constant part
  start-up   wall seconds from building the loader to its first batch
  opens      openat() calls on shard (.tar) and index (.idx) files, all threads, from the
             loader's construction on (the shard table, which rank 0 builds once for the run
             and sends to every rank, is built first and not counted: 2 opens per shard)
  maps       .tar files memory-mapped at the first batch (/proc/self/maps)
The stream measured is the last one: a reading rank other than rank 0.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

CAPTION = "a tiny sample number {} of the scale benchmark"
TRACE_MARKER = "/ov2-scale-bench-loader-starts-here"


def make_dataset(root: str, shards: int, samples: int, noise_side: int = 0) -> str:
    """`shards` shards of `samples` samples each, with DALI indexes, under root (once): a flat
    16 x 16 JPEG (tiny), or with `noise_side` a random-noise JPEG of that side (noise does not
    compress: ~6 KB stored at 64 px, ~17 KB at 128 px)."""
    import numpy as np
    from PIL import Image

    from ov2_megatron.data.shards import Sample, ShardWriter

    folder = os.path.join(root, f"{shards}x{samples}" + (f"-noise{noise_side}" if noise_side
                                                           else ""))
    done = os.path.join(folder, "complete")
    if os.path.exists(done):
        return folder
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, samples_per_shard=samples)
    for i in range(shards * samples):
        image = Image.fromarray(rng.integers(0, 255, (noise_side, noise_side, 3), np.uint8)) \
            if noise_side else Image.new("RGB", (16, 16), (90, 120, 150))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        writer.write(Sample(f"{i:09d}", buf.getvalue(), CAPTION.format(i % 1000)))
    writer.close()
    open(done, "w").close()
    return folder


def tokenizer_for(root: str) -> str:
    from ov2_megatron.data.tokenizer import train_tokenizer

    path = os.path.join(root, "tokenizer")
    if os.path.exists(path + ".model"):
        return path + ".model"
    return train_tokenizer([CAPTION.format(i) for i in range(1000)], path, 64)


def measure_rank(folder: str, tokenizer: str, streams: int, shuffle_buffer: int = 64,
                 dont_use_mmap: bool = False) -> dict:
    """The last stream of `streams` in this process, as a reading rank of a run builds it:
    given the run's shard table (which rank 0 builds once, before the marker), then its
    loader. Loader RSS, start-up seconds, mapped shards."""
    import time

    import psutil

    from ov2_megatron.data.config import DataConfig
    from ov2_megatron.data.dali_pipeline import ImageCaptionLoader
    from ov2_megatron.data.shard_table import build_table
    from ov2_megatron.data.tokenizer import CaptionTokenizer

    CaptionTokenizer.from_file(tokenizer)  # loaded before the baseline: not the loader's memory
    table = build_table(folder)
    try:  # a marker in the trace: the opens after it are the reading rank's own
        os.open(TRACE_MARKER, os.O_RDONLY)
    except OSError:
        pass
    process = psutil.Process()
    config = DataConfig(train_shards=folder, tokenizer_model=tokenizer, resolution=16,
                        num_threads=1, shuffle_buffer=shuffle_buffer, color_jitter=0.0,
                        dont_use_mmap=dont_use_mmap,
                        grayscale_probability=0.0)
    rss, anon, start = process.memory_info().rss, _rss_anon(), time.perf_counter()
    loader = ImageCaptionLoader(config, dp_rank=streams - 1, dp_size=streams, batch_size=32,
                                device="cpu", table=table)
    for _ in range(1 + shuffle_buffer // 32):  # until the buffer has filled
        next(loader)
    seconds = time.perf_counter() - start
    with open("/proc/self/maps") as f:
        maps = {line.split()[-1] for line in f if line.rstrip().endswith(".tar")}
    return dict(rss_mib=(process.memory_info().rss - rss) / 2**20,
                anon_mib=(_rss_anon() - anon) / 2**20, startup_s=seconds, mapped_shards=len(maps))


def _rss_anon() -> int:
    """Resident anonymous memory (heap, not file pages): what the kernel cannot drop."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def run_one(folder: str, tokenizer: str, streams: int, trace: str,
            shuffle_buffer: int = 64, dont_use_mmap: bool = False) -> dict:
    """measure_rank in a fresh process under strace; adds the shard/index opens."""
    code = ("import json, sys; from ov2_megatron.perf.loader_scale import measure_rank; "
            f"print(json.dumps(measure_rank({folder!r}, {tokenizer!r}, {streams}, "
            f"{shuffle_buffer}, {dont_use_mmap})))")
    done = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", trace,
                           sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"scale measurement failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with open(trace) as f:
        lines = f.read().split(TRACE_MARKER, 1)[-1].splitlines()
    opens = [line for line in lines if re.search(r'\.(tar|idx)"', line)]
    result["tar_opens"] = sum('.tar"' in line for line in opens)
    result["idx_opens"] = sum('.idx"' in line for line in opens)
    return result


def scale_benchmark(sizes: list[tuple[int, int]], streams: list[int], root: str) -> list[dict]:
    os.makedirs(root, exist_ok=True)
    tokenizer = tokenizer_for(root)
    rows = []
    for shards, samples in sizes:
        folder = make_dataset(root, shards, samples)
        for n in streams:
            row = dict(shards=shards, samples=shards * samples, streams=n,
                       **run_one(folder, tokenizer, n, os.path.join(root, "trace.txt")))
            rows.append(row)
            print(format_row(row), flush=True)
    for n in streams:
        mine = sorted((r for r in rows if r["streams"] == n), key=lambda r: r["samples"])
        small, large = mine[0], mine[-1]
        if large["samples"] > small["samples"]:
            slope = (large["rss_mib"] - small["rss_mib"]) * 2**20 / (large["samples"] -
                                                                   small["samples"])
            print(f"streams {n}: {slope:.0f} B per dataset sample per rank (RSS growth from "
                  f"{small['samples']:,} to {large['samples']:,} samples)", flush=True)
    return rows


def buffer_benchmark(buffers: list[int], noise_sides: list[int], root: str,
                     dont_use_mmap: bool = False) -> None:
    """RSS per shuffle-buffer sample: rank 0 of 1 stream at each buffer size, on 20 shards of
    500 noise images per side; the slope between the smallest and largest buffer."""
    tokenizer = tokenizer_for(root)
    for side in noise_sides:
        folder = make_dataset(root, 20, 500, noise_side=side)
        stored = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
                     if name.endswith(".tar")) / 10_000
        rss = {}
        for buffer in buffers:
            row = run_one(folder, tokenizer, 1, os.path.join(root, "trace.txt"), buffer,
                          dont_use_mmap)
            rss[buffer] = row["rss_mib"], row["anon_mib"]
            print(f"noise {side} px ({stored / 1000:.1f} KB stored per sample), shuffle buffer "
                  f"{buffer:,}: RSS +{row['rss_mib']:.0f} MiB (anonymous +{row['anon_mib']:.0f})",
                  flush=True)
        low, high = min(buffers), max(buffers)
        per = [(rss[high][i] - rss[low][i]) * 2**20 / (high - low) / 1000 for i in (0, 1)]
        print(f"noise {side} px{' (dont_use_mmap)' if dont_use_mmap else ''}: {per[0]:.1f} KB RSS ({per[1]:.1f} KB anonymous) per buffered "
              "sample", flush=True)


def format_row(row: dict) -> str:
    return (f"{row['shards']:>6,} shards {row['samples']:>10,} samples  streams {row['streams']}"
            f"  stream {row['streams'] - 1}: RSS +{row['rss_mib']:.0f} MiB (anonymous "
            f"+{row['anon_mib']:.0f}), start-up {row['startup_s']:.1f} s, "
            f"opens .tar {row['tar_opens']:,} .idx {row['idx_opens']:,}, "
            f"mapped shards {row['mapped_shards']:,}")


__all__ = ["make_dataset", "measure_rank", "run_one", "scale_benchmark", "buffer_benchmark",
           "format_row"]
