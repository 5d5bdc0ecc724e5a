"""Evaluation: validation caption loss and token accuracy, greedy captions next to the true
ones, and a linear probe on frozen encoder features (synthetic data: the dominant shape and
colour, read off the caption). Every rank runs the same code (TP/PP collectives need
all ranks), over the same number of batches; only global rank 0 prints and logs. A run with
no validation set (one own training shard, nothing to hold out) skips validation."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from megatron.core.utils import unwrap_model

from ov2_megatron.data.dali_pipeline import ImageCaptionLoader
from ov2_megatron.data.tokenizer import CaptionTokenizer
from ov2_megatron.models.generation import greedy_captions
from ov2_megatron.models.token_drop import keep_indices
from ov2_megatron.parallel.initialize import local_device
from ov2_megatron.training import checkpoint
from ov2_megatron.training.replica_input import ReplicaInput, reads_data
from ov2_megatron.training.step import MicroBatch, run_schedule


def _eval_batches(run, shards: str, limit: int):
    """This replica's first `limit` evaluation batches, cut to the count every rank has. DALI
    splits the samples over the data-parallel ranks, so one rank may hold a batch more than
    another; every batch runs collectives (run_schedule all-reduces over the world), so an
    unequal count would leave a rank waiting for ever. One rank per replica decodes them and
    shares them (replica_input.py); ranks after pipeline stage 0 get no images."""
    dp_rank, dp_size = checkpoint.data_parallel_info()
    items = None
    if reads_data():
        loader = ImageCaptionLoader(run.data, dp_rank=dp_rank, dp_size=dp_size,
                                    batch_size=run.train.micro_batch, training=False,
                                    shards=shards)
        items = list(itertools.islice(iter(loader), limit))
    shared = ReplicaInput((3, run.data.resolution, run.data.resolution),
                          run.data.caption_length, local_device())
    items = shared.share_items(items)
    count = torch.tensor([len(items)], dtype=torch.int64, device=local_device())
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    return items[:int(count.item())]


def eval_keep_indices(run, geom, index: torch.Tensor) -> torch.Tensor:
    """[b] sample positions -> [b, k] kept patches: the training draw (the official code
    drops tokens at evaluation too), or every patch with train.eval_token_drop off."""
    if run.train.eval_token_drop:
        return keep_indices(index, geom.num_patches, geom.num_kept, run.train.seed)
    return torch.arange(geom.num_patches).expand(len(index), -1)


def schedule_parts(batch: MicroBatch, parallel, pad_id: int) -> list[MicroBatch]:
    """One evaluation batch as the micro-batches of one schedule call: itself, or under
    interleaved pipelining (which needs at least PP micro-batches) PP equal parts, the batch
    first padded with all-PAD captions, which carry no loss and no token."""
    if not parallel.virtual_pipeline:
        return [batch]
    parts = parallel.pipeline
    extra = -batch.tokens.shape[0] % parts
    images = batch.images  # None after pipeline stage 0 (replica_input.py)
    if extra:
        if images is not None:
            images = torch.cat([images, images[:1].expand(extra, -1, -1, -1)])
        batch = MicroBatch(images, torch.cat([batch.tokens, batch.tokens.new_full(
                               (extra, batch.tokens.shape[1]), pad_id)]),
                           torch.cat([batch.keep_idx, batch.keep_idx[:1].expand(extra, -1)]))
    image_parts = [None] * parts if images is None else images.chunk(parts)
    return [MicroBatch(*pieces) for pieces in zip(image_parts, batch.tokens.chunk(parts),
                                                  batch.keep_idx.chunk(parts))]


def validation(run, model, geom, logger, step: int) -> dict:
    if not run.data.val_shards:  # own shards, one of them: nothing held out (data_sources.py)
        return {}
    for chunk in model:
        chunk.eval()
    items = _eval_batches(run, run.data.val_shards, run.train.eval_batches)
    device = local_device()
    totals, mismatched = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for n, item in enumerate(items):
            size = item["tokens"].shape[0]
            index = torch.arange(size) + n * size
            keep = eval_keep_indices(run, geom, index).to(device)
            images, tokens = item["images"], item["tokens"].to(device)
            images = None if images is None else images.to(device)
            # The same captions with other images: what the loss owes to pixels.
            rolled = None if images is None else images.roll(1, dims=0)
            for sums, batch in ((totals, MicroBatch(images, tokens, keep)),
                                (mismatched, MicroBatch(rolled, tokens, keep))):
                parts = schedule_parts(batch, run.parallel, run.model.decoder.pad_id)
                sums += run_schedule(model, parts, geom, parts[0].tokens.shape[0], True)
    result = dict(val_loss=float(totals[0] / max(totals[1], 1)),
                  val_token_accuracy=float(totals[2] / max(totals[1], 1)),
                  val_loss_wrong_images=float(mismatched[0] / max(mismatched[1], 1)))
    logger.log(step, result)
    if run.train.num_generate and items and run.parallel.pipeline == 1:
        _show_captions(run, model, geom, items[0], logger, step)
    for chunk in model:
        chunk.train()
    return result


def _show_captions(run, model, geom, item, logger, step: int) -> None:
    tokenizer = CaptionTokenizer.from_file(run.data.tokenizer_model)
    count = min(run.train.num_generate, item["images"].shape[0])
    images = item["images"][:count].to(local_device())
    keep = eval_keep_indices(run, geom, torch.arange(count))
    ids = greedy_captions(unwrap_model(model[0]), images, keep.to(images.device),
                          tokenizer.bos_id, tokenizer.eos_id, run.model.decoder.caption_length)
    lines = []
    for true, row in zip(item["captions"][:count], ids.tolist()):
        lines.append(f"  true:      {true}\n  generated: {tokenizer.decode(row)}")
    if dist.get_rank() == 0:
        print("captions (validation images):\n" + "\n".join(lines), flush=True)
    logger.text("captions", "\n\n".join(lines), step)


def final(run, model, geom, logger, step: int, loader) -> dict:
    summary = validation(run, model, geom, logger, step)
    summary["bad_samples"] = dict(loader.stats())
    if run.train.linear_probe and run.synthetic and run.parallel.pipeline == 1:
        probe = linear_probe(run, model)
        logger.log(step, probe)
        summary.update(probe)
        if dist.get_rank() == 0:
            print("linear probe on frozen features: " + ", ".join(
                f"{k} {v:.1%}" for k, v in probe.items()), flush=True)
    return summary


def linear_probe(run, model, train_batches: int = 24, val_batches: int = 8) -> dict:
    """Logistic regression on frozen encoder features -> the scene's dominant shape and colour
    (the most frequent in its caption; ties go to the first named).

    Features are the mean of the patch tokens: the captioning loss trains patch tokens (the
    decoder never sees CLS), and patch tokens are what LLaVA-style models consume."""
    from ov2_megatron.data.synthetic import COLORS, SHAPES

    encoder = unwrap_model(model[0])
    encoder.eval()

    def features(shards, limit):
        feats, captions = [], []
        with torch.no_grad():
            for item in _eval_batches(run, shards, limit):
                patches, _ = encoder.encode(item["images"].to(local_device()))
                feats.append(patches.mean(dim=1).float().cpu())
                captions += item["captions"]
        return torch.cat(feats), captions

    train_x, train_caps = features(run.data.train_shards, train_batches)
    val_x, val_caps = features(run.data.val_shards, val_batches)
    encoder.train()
    result = {}
    for attribute, words in (("shape", SHAPES), ("colour", tuple(COLORS))):
        train_y = torch.tensor([_dominant_word(c, words) for c in train_caps])
        val_y = torch.tensor([_dominant_word(c, words) for c in val_caps])
        accuracy = _fit_and_score(train_x, train_y, val_x, val_y, len(words))
        chance = float(torch.bincount(val_y, minlength=len(words)).max()) / len(val_y)
        result[f"probe_{attribute}_accuracy"] = accuracy
        result[f"probe_{attribute}_chance"] = chance
    return result


def _dominant_word(caption: str, words: tuple[str, ...]) -> int:
    """Index of the most frequent of `words` in the caption (ties: the first named)."""
    tokens = caption.replace(",", " ").replace(".", " ").split()
    counts = [(tokens.count(w), -tokens.index(w) if w in tokens else 0, i)
              for i, w in enumerate(words)]
    return max(counts)[2]


def _fit_and_score(train_x, train_y, val_x, val_y, classes: int) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y)
        loss = loss + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(val_x).argmax(1) == val_y).float().mean())
