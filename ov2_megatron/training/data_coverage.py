"""How a run's length relates to its training set: samples, steps per epoch, epochs covered.

`--dry-run` prints it, so a run that would cycle 83 samples a million times, or whose set is
smaller than one global batch, is seen on a login node instead of in the loss curve:

    data: 83 training samples (counted in the shards); 32,768 samples per step; 0.0025 steps
    per epoch; the run covers 154,357,415 epochs (390,981 steps x 32,768 = 12,811,665,408
    samples)

A weighted mixture repeats each source by its weight (data/mixing.py), so it also gets one
line per source. Call after data_sources.choose_sources (which may hold the last training
shard out for validation: the count is of what the run trains on) and after the shards were
checked (data_sources.check_data): the counts open every training shard.
"""

from __future__ import annotations

from ov2_megatron.data.config import resolve_plain_spec
from ov2_megatron.data.mixing import is_mixture, parse_sources
from ov2_megatron.training.data_sources import count_samples, given
from ov2_megatron.training.run_config import RunConfig, total_steps

# The paper's stage 1 shows its ~1B-image set (Recap-DataComp-1B) about ten times (12.8B
# samples); far beyond that a caption model overfits its captions. Said, not refused: a smoke
# test or a deliberate overfit is a fine reason to do it.
MANY_EPOCHS = 50


def coverage_lines(run: RunConfig) -> list[str]:
    """The data line, one line per mixture source, and the warnings; [] when the run names no
    training data (the dry run says so already)."""
    steps, batch = total_steps(run.train), run.train.global_batch
    if run.synthetic:
        samples = run.synthetic.get("num_train", 0)
        where = "the synthetic set: synthetic.num_train in the config"
        sources = [("the synthetic set", samples, 1.0)]
    elif given(run.data.train_shards):
        sources = source_sizes(run.data.train_shards)
        samples, where = sum(n for _, n, _ in sources), "counted in the shards"
    else:
        return []
    seen = steps * batch
    lines = [f"data: {samples:,} training samples ({where}); {batch:,} samples per step; "
             f"{_amount(samples / batch)} steps per epoch; the run covers "
             f"{_amount(seen / samples) if samples else 'infinitely many'} epochs "
             f"({steps:,} steps x {batch:,} = {seen:,} samples)"]
    if len(sources) > 1:
        lines += [f"data: {path}: {n:,} samples, {share:.1%} of each batch: the run covers "
                  f"{_amount(seen * share / n) if n else 'infinitely many'} epochs of it"
                  for path, n, share in sources]
    return lines + _warnings(samples, batch, seen, sources)


def source_sizes(spec) -> list[tuple[str, int, float]]:
    """(source, samples, share of each batch) for each source of a shard spec; a plain spec
    is one source with share 1. The counts read the DALI index header of every shard (one
    small read each: ~100k reads for the paper's 100k shards, a minute or so on a parallel
    file system, fine for a dry run but not done at every start-up), and list the members of
    each tar that has no index yet (a pass over its headers: far slower)."""
    sources = parse_sources(spec)
    if not is_mixture(sources):
        shards = [s for source in sources for s in resolve_plain_spec(source.spec)]
        return [("data.train_shards", count_samples(shards, enough=float("inf")), 1.0)]
    total_weight = sum(source.weight for source in sources)
    return [(source.spec, count_samples(resolve_plain_spec(source.spec), enough=float("inf")),
             source.weight / total_weight) for source in sources]


def _warnings(samples: int, batch: int, seen: int, sources) -> list[str]:
    out = []
    if samples < batch:
        out.append(f"warning: the training set ({samples:,} samples) is smaller than one global "
                   f"batch ({batch:,}): every step repeats samples within itself; add data or "
                   "lower train.global_batch")
    repeats = max((seen * share / n if n else float("inf"), path) for path, n, share in sources)
    if repeats[0] > MANY_EPOCHS:
        which = f" ({repeats[1]})" if len(sources) > 1 else ""
        out.append(f"warning: the run shows each training sample{which} "
                   f"{_amount(repeats[0])} times, more than {MANY_EPOCHS} (the paper's stage 1: "
                   "about 10): expect it to overfit; add data, or shorten the run "
                   "(train.samples or train.steps)")
    return out


def _amount(x: float) -> str:
    """1,234,567 / 12 / 2.4 / 0.0025: whole numbers from 100 up, else 2 significant digits."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.2g}"
