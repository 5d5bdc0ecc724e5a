"""Host memory of one reading rank's data loader, from measured constants (#24 item 4).

    bytes ~ base + INDEX x samples indexed + BUFFERED x data.shuffle_buffer
                 + (data.prefetch + 2) x batch x R^2 x 3 x 5        (CPU decoding)

Measured on CPU with DALI 2.4 (tools/bench_data.py --scale and --shuffle-buffers;
docs/benchmarks/2026-12-08-loader-scale.md), resident anonymous memory, which the kernel
cannot drop:
  INDEX     360 B per sample in the shard list DALI is given: its sample table, parsed from
            the index files. A training stream gives DALI only its range (stream_split.py):
            44 B per dataset sample at 8 streams, 361 B at 1;
  BUFFERED  10 KB per sample held in the reader's shuffle buffer, the same for 6 KB and 17 KB
            stored samples: the encoded bytes stay in the memory-mapped shard, as page cache
            the kernel can drop under pressure (~1.2x the stored size more of RSS);
  base      ~100 MiB: the pipeline, its threads and small batches.
With data.dont_use_mmap the buffer holds copies of the encoded samples, in anonymous memory:
measured 16.1 KB per buffered sample at 6.2 KB stored and 32.5 KB at 16.9 KB (bench_data.py
--shuffle-buffers --dont-use-mmap), so 1.5 x the mean stored sample is added to the 10 KB
(3 KB above both measurements).
The decode buffers (uint8 decode and float32 output, prefetched batches plus the one in use)
are counted from their shapes; on GPU decoding they live in GPU memory instead.
"""

from __future__ import annotations

from dataclasses import dataclass

INDEX_BYTES_PER_SAMPLE = 360
BUFFER_BYTES_PER_SAMPLE = 10_000
BASE_BYTES = 100 * 2**20
COPY_FACTOR = 1.5


@dataclass(frozen=True)
class LoaderMemory:
    index: int
    buffer: int
    decode: int
    base: int = BASE_BYTES

    @property
    def total(self) -> int:
        return self.index + self.buffer + self.decode + self.base

    def describe(self, samples: int, shuffle_buffer: int) -> str:
        return (f"{self.total / 2**30:.1f} GiB ({samples:,} samples indexed x "
                f"{INDEX_BYTES_PER_SAMPLE} B = {self.index / 2**30:.1f} GiB, shuffle buffer "
                f"{shuffle_buffer:,} x {self.buffer / max(shuffle_buffer, 1) / 1000:.1f} KB = "
                f"{self.buffer / 2**30:.1f} GiB, decode buffers "
                f"{self.decode / 2**30:.2f} GiB, base {self.base / 2**30:.1f} GiB)")


def loader_memory(samples_indexed: int, shuffle_buffer: int, prefetch: int, batch: int,
                  resolution: int, gpu_decoding: bool, copied_bytes_per_sample: int = 0
                  ) -> LoaderMemory:
    """Host bytes of one reading rank's loader (see the module docstring);
    `copied_bytes_per_sample`: the mean stored sample under data.dont_use_mmap, else 0."""
    decode = 0 if gpu_decoding else (prefetch + 2) * batch * resolution ** 2 * 3 * 5
    per_buffered = BUFFER_BYTES_PER_SAMPLE + COPY_FACTOR * copied_bytes_per_sample
    return LoaderMemory(index=INDEX_BYTES_PER_SAMPLE * samples_indexed,
                        buffer=int(per_buffered * shuffle_buffer), decode=decode)


__all__ = ["LoaderMemory", "loader_memory", "INDEX_BYTES_PER_SAMPLE",
           "BUFFER_BYTES_PER_SAMPLE", "BASE_BYTES"]
