"""Where a run's data comes from, and the start-up checks that need its files.

The synthetic set is the demo's data: it is built only when the run names no shards of its
own. Given `data.train_shards`, a run trains and validates on the user's data alone
(`choose_sources`, said in the log):
 - validation reads data.val_shards, or else the last training shard, held out of training
   (with one shard there is nothing to hold out: validation is skipped, and the log says so);
 - the linear probe, which reads shape/colour labels only synthetic captions carry, is off.
`check_data` opens what the run will read, before any compute: the shards (readable tars,
DALI index files), the tokenizer and the vocabulary the model allocates for it, which follows
the tokenizer unless `--set model.decoder.vocab_size` pinned it. `--dry-run` runs the same
checks, so a login node sees these errors instead of the first training step.
"""

from __future__ import annotations

import os

from ov2_megatron.config import padded_vocab_size
from ov2_megatron.data.config import index_path_for, resolve_shard_spec
from ov2_megatron.training.run_config import RunConfig

VOCAB_KEY = "model.decoder.vocab_size"


def choose_sources(run: RunConfig) -> list[str]:
    """Settle the data sources in `run` (in place); returns what was chosen, for the log.
    Idempotent: every rank (and a dry run, then the run) reaches the same choice."""
    if not given(run.data.train_shards):
        if run.synthetic:
            return [f"data: the synthetic set ({run.synthetic.get('num_train')} train / "
                    f"{run.synthetic.get('num_val')} validation images, built on first use; "
                    "--set data.train_shards=... trains on your own shards instead)"]
        return []
    notes = [f"data: data.train_shards {run.data.train_shards}"]
    if run.synthetic:
        run.synthetic = {}
        notes[0] += " (your shards: the synthetic set is not built)"
    notes += _choose_validation(run)
    if run.train.linear_probe:
        run.train.linear_probe = False
        notes.append("linear probe: off (it reads the shape/colour labels of the synthetic set, "
                     "which your shards do not have)")
    return notes


def _choose_validation(run: RunConfig) -> list[str]:
    data = run.data
    if given(data.val_shards):
        return [f"validation: data.val_shards {data.val_shards}"]
    if _is_mixture(data.train_shards):  # splitting one source would change its weight
        return ["validation: none (data.val_shards is empty and a weighted mixture is not "
                "split): set data.val_shards to validate"]
    shards = resolve_shard_spec(data.train_shards)
    if len(shards) < 2:
        return ["validation: none (data.val_shards is empty and a single training shard leaves "
                "nothing to hold out): set data.val_shards to validate"]
    # A whole shard, not a sample range: DALI's reader splits shard lists, not samples.
    data.train_shards, data.val_shards = ",".join(shards[:-1]), shards[-1]
    return [f"validation: held out the last training shard {shards[-1]} (1 of {len(shards)} "
            "shards; it is not trained on): set data.val_shards to choose the set"]


def given(spec) -> bool:
    """Whether a shard spec names anything (a string, or a list of strings or sources)."""
    return bool(spec.strip()) if isinstance(spec, str) else bool(spec)


def _is_mixture(spec) -> bool:
    """A weighted mixture: a list of {"path", "weight"} entries, or its JSON text."""
    if isinstance(spec, str):
        return spec.strip().startswith("[")
    return any(isinstance(entry, dict) for entry in spec)


def check_data(run: RunConfig, dp_size: int, shards: bool = True) -> list[str]:
    """Shards, index files, the validation set's size and the tokenizer; raises ValueError /
    OSError naming the file and the fix. Sets model.decoder.vocab_size from the tokenizer.
    `shards` False: the tokenizer only (a run checks the shards on one rank: each check opens
    every shard)."""
    data = run.data
    data.validate()
    notes = []
    if shards:
        train = resolve_shard_spec(data.train_shards)
        notes.append(_index_note("training", train))
        _check_one_sample_per_rank("training", train, dp_size)
        if given(data.val_shards):
            val = resolve_shard_spec(data.val_shards)
            notes.append(_index_note("validation", val))
            _check_one_sample_per_rank("validation", val, dp_size)
    notes.append(follow_tokenizer(run))
    check_tokenizer_fits(run)
    return notes


def probe(run: RunConfig) -> list[str]:
    """--dry-run's read of every shard's first samples (data/shard_probe.py): what training
    would skip, cut shards, stale index files."""
    from ov2_megatron.data.shard_probe import probe_shards

    data = run.data
    sets = [("training", data.train_shards)]
    if given(data.val_shards):
        sets.append(("validation", data.val_shards))
    return [line for what, spec in sets
            for line in probe_shards(resolve_shard_spec(spec), data).lines(what)]


def loader_memory_check(run: RunConfig, world: int, gpus_per_node: int,
                        refuse: bool) -> list[str]:
    """The loader's host memory per reading rank and per node (data/loader_memory.py), from the
    training set's sample count in its index headers (skipped, saying so, while any index is
    missing: counting would scan every tar). `refuse`: a node that cannot hold it is a
    ValueError naming the fix, before any compute (a run); else one line (a plan)."""
    import psutil
    import torch

    from ov2_megatron.data.loader_memory import loader_memory

    data, p = run.data, run.parallel
    shards = resolve_shard_spec(data.train_shards)
    indexes = [index_path_for(shard) for shard in shards]
    if not all(os.path.isfile(index) for index in indexes):
        return ["loader memory: not estimated until every training shard has its index file "
                "(the first run makes them)"]
    samples = sum(_index_samples(index) for index in indexes)
    copied = sum(os.path.getsize(shard) for shard in shards) // max(samples, 1) \
        if data.dont_use_mmap else 0
    share = -(-samples // max(1, world // (p.tensor * p.pipeline)))  # its stream's range
    need = loader_memory(share, data.shuffle_buffer, data.prefetch, run.train.micro_batch,
                         data.resolution, torch.cuda.is_available(), copied)
    readers = max(1, min(gpus_per_node, world // p.pipeline) // p.tensor)  # replica_input.py
    node, host = need.total * readers, psutil.virtual_memory().total
    line = (f"loader memory per reading rank: {need.describe(share, data.shuffle_buffer)}; "
            f"per node ({readers} reading rank(s) of {gpus_per_node}): {node / 2**30:.1f} GiB, "
            f"this machine has {host / 2**30:.0f} GiB")
    if node > 0.9 * host:
        fix = (f"the data loaders would need {node / 2**30:.1f} GiB of this node's "
               f"{host / 2**30:.0f} GiB: lower data.shuffle_buffer ({data.shuffle_buffer:,}), "
               "train on a subset of the shards, or use nodes with more memory "
               "(docs/benchmarks/2026-12-08-loader-scale.md)")
        if refuse:
            raise ValueError(fix)
        line += f"; WARNING: {fix}"
    return [line]


def _index_note(what: str, shards: list[str]) -> str:
    missing = [s for s in shards if not os.path.isfile(index_path_for(s))]
    for shard in shards:
        if shard not in missing:
            _index_samples(index_path_for(shard))  # a torn index would fail inside DALI
    if not missing:
        return f"{what} shards: {len(shards)}, DALI index files present"
    writable = all(os.access(os.path.dirname(os.path.abspath(s)), os.W_OK) for s in missing)
    where = ("beside them (the directories are writable)" if writable else
             "in data.index_cache_dir (the shard directories are read-only)")
    return (f"{what} shards: {len(shards)}, index files missing for {len(missing)} (e.g. "
            f"{missing[0]}): the loader makes them on first use, {where}")


def _index_samples(index_path: str) -> int:
    """Sample count from the header of a DALI v1.2 index (`v1.2 N`)."""
    with open(index_path) as f:
        header = f.readline().split()
    if len(header) != 2 or not header[1].isdigit():
        raise ValueError(f"index {index_path} has header {header}, not 'v1.2 N': delete it "
                         "(DALI then indexes the tar) or re-create the shard")
    return int(header[1])


def count_samples(shards: list[str], enough: int) -> int:
    """Samples in `shards`, counted until `enough` (index headers, else tar member names)."""
    from ov2_megatron.data.shards import ShardCutError, iter_shard

    total = 0
    for shard in shards:
        index = index_path_for(shard)
        if os.path.isfile(index):
            total += _index_samples(index)
        else:
            try:
                total += sum(1 for _ in iter_shard(shard, with_images=False))
            except ShardCutError as cut:  # the probe and the loader name it
                total += cut.complete
        if total >= enough:
            break
    return total


def _check_one_sample_per_rank(what: str, shards: list[str], dp_size: int) -> None:
    """Each data-parallel rank reads its own slice of a set, and DALI's reader refuses a slice
    with no sample in it; so a set needs one sample per rank. Refusing here, before compute,
    is the honest answer for validation too: letting sample-less ranks skip would report a
    loss over a set smaller than the ranks evaluating it, and the refusal used to surface
    only after training, as a DALI traceback. (Counting stops at dp_size samples: cheap.)"""
    count = count_samples(shards, enough=dp_size)
    if count < dp_size:
        key = "data.val_shards" if what == "validation" else "data.train_shards"
        raise ValueError(f"the {what} set ({len(shards)} shard(s)) has {count} sample(s) but "
                         f"the data-parallel size is {dp_size}: each data-parallel rank reads "
                         f"its own slice, so it needs >= {dp_size} samples; add samples to "
                         f"{key} or point it at a larger set")


def follow_tokenizer(run: RunConfig) -> str:
    """model.decoder.vocab_size := the tokenizer's pieces, unless given with --set (then the
    two must agree). The model pads it to a multiple of model.decoder.vocab_pad_multiple."""
    from ov2_megatron.data.tokenizer import CaptionTokenizer

    path, decoder = run.data.tokenizer_model, run.model.decoder
    pieces = CaptionTokenizer.from_file(path).vocab_size
    if VOCAB_KEY in run.explicit and decoder.vocab_size != pieces:
        raise ValueError(f"{VOCAB_KEY} {decoder.vocab_size} (given with --set) does not match "
                         f"the {pieces} pieces of tokenizer {path}: drop the --set (the "
                         f"vocabulary then follows the tokenizer) or set {VOCAB_KEY}={pieces}")
    source = "as given with --set" if VOCAB_KEY in run.explicit else "from the tokenizer"
    decoder.vocab_size = pieces
    padded = padded_vocab_size(pieces, decoder.vocab_pad_multiple)
    return (f"vocabulary: {VOCAB_KEY} {pieces} {source} ({path}), padded to {padded} (a "
            f"multiple of model.decoder.vocab_pad_multiple {decoder.vocab_pad_multiple})")


def check_tokenizer_fits(run: RunConfig) -> None:
    """Every id the tokenizer can emit must index the model's vocabulary. Checked on the host
    before compute: on a GPU an id past the embedding is a device-side assert."""
    from ov2_megatron.data.tokenizer import CaptionTokenizer

    tokenizer = CaptionTokenizer.from_file(run.data.tokenizer_model)
    vocab = run.model.decoder.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"tokenizer {run.data.tokenizer_model} has {tokenizer.vocab_size} "
                         f"pieces but model.decoder.vocab_size is {vocab}: drop its --set "
                         f"(it follows the tokenizer) or set it to {tokenizer.vocab_size}")
    if tokenizer.pad_id != run.model.decoder.pad_id:
        raise ValueError(f"tokenizer {run.data.tokenizer_model} pads with id {tokenizer.pad_id} "
                         f"but model.decoder.pad_id is {run.model.decoder.pad_id}: the loss "
                         "mask would supervise padding; make them equal")
