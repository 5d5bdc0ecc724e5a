"""tools/caption.py and the exported caption decoder on real checkpoints written at TP=2
(causal decoder, no decoder positions) and PP=2 (learned decoder positions); both read the
evaluation draw of kept patches (tiny_cpu evaluates with token drop, as the official code;
without it and without learned positions every patch is read): greedy captions of megatron's own
generation (models/generation.py on the loaded checkpoint) == greedy of the standalone
decoder, in memory and exported; beam size 1 == greedy; beam size 3 scores >= greedy."""

import json

import numpy as np
from PIL import Image

from tests.conversion.conftest import _load_tool, run_tools
from tests.conversion.test_preprocess_parity import photo

SCORE_SLACK = 1e-4  # fp32 log-probabilities summed over the caption


def _compare_rank(cases: list[tuple[str, str, str]]) -> list[dict]:
    """(run_dir, exported decoder dir, pixels.npy) each -> the captions every path gives."""
    import torch

    from ov2_megatron.conversion import caption_decoder_export, caption_search
    from ov2_megatron.conversion import megatron_checkpoint
    from ov2_megatron.data.tokenizer import BOS_ID, EOS_ID
    from ov2_megatron.models.generation import greedy_captions

    keep_for = _load_tool("caption").keep_for
    out = []
    for run_dir, decoder_dir, pixels_path in cases:
        step_dir, run = megatron_checkpoint.locate(run_dir)
        chunk, geom = megatron_checkpoint.load_model(step_dir, run)
        chunk.float()
        images = torch.from_numpy(np.load(pixels_path))
        keep = keep_for(run, geom, torch.arange(len(images)))
        megatron = greedy_captions(chunk, images, keep, BOS_ID, EOS_ID,
                                   run.model.decoder.caption_length)
        with torch.no_grad():
            patches, _ = chunk.encode(images)
        tokens = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        exported = caption_decoder_export.load(decoder_dir)
        in_memory = caption_decoder_export.from_standard(
            megatron_checkpoint.standard_of(chunk, run, geom, step_dir), run, geom)
        greedy = caption_search.greedy(exported, tokens)
        beam1, _ = caption_search.beam_search(exported, tokens, 1)
        beam3, beam3_scores = caption_search.beam_search(exported, tokens, 3)
        out.append(dict(
            megatron=megatron.tolist(), greedy=greedy.tolist(), beam1=beam1.tolist(),
            in_memory=caption_search.greedy(in_memory, tokens).tolist(), beam3=beam3.tolist(),
            beam3_scores=beam3_scores.tolist(),
            greedy_scores=caption_search.sequence_log_prob(exported, tokens, greedy).tolist(),
            beam3_rescored=caption_search.sequence_log_prob(exported, tokens, beam3).tolist(),
            num_image_tokens=tokens.shape[1], num_patches=geom.num_patches,
            # learned decoder positions or evaluation token drop: the training count
            expected_image_tokens=geom.num_kept if (run.model.decoder.pos_embed == "learned"
                                                    or run.train.eval_token_drop)
            else geom.num_patches))
    return out


def test_captions_from_checkpoint_and_exported_decoder(tp2_run, pp2_run, tmp_path):
    from ov2_megatron.conversion import megatron_checkpoint
    from ov2_megatron.data.preprocess import from_run
    from tests.harness import run_distributed

    images = tmp_path / "images"
    images.mkdir()
    paths = [photo(str(images / f"photo{i}.png"), 317 - 40 * i, 211 + 30 * i) for i in range(3)]
    cases, commands = [], []
    for name, run_dir in (("tp2", tp2_run), ("pp2", pp2_run)):
        _, run = megatron_checkpoint.locate(run_dir)
        transform = from_run(run)
        pixels = np.stack([transform(Image.open(path)) for path in paths])
        pixels_path, decoder_dir = str(tmp_path / f"{name}.npy"), str(tmp_path / f"dec_{name}")
        np.save(pixels_path, pixels)
        cases.append((run_dir, decoder_dir, pixels_path))
        commands += [
            ("convert_checkpoint", ["export-decoder", "--checkpoint", run_dir, "--output",
                                    decoder_dir]),
            ("caption", ["--checkpoint", run_dir, "--decoder", decoder_dir, "--images",
                         str(images), "--batch-size", "2", "--output",
                         str(tmp_path / f"{name}_greedy.jsonl")]),
            ("caption", ["--checkpoint", run_dir, "--images", *paths, "--beam", "3",
                         "--output", str(tmp_path / f"{name}_beam3.jsonl")])]
    results = run_tools(*commands)
    assert "caption decoder: 2 blocks" in results[0][1], results[0][1]
    compared = run_distributed(_compare_rank, 1, args=(cases,), timeout=300)[0]
    for (name, _), got in zip((("tp2", 0), ("pp2", 0)), compared):
        assert got["megatron"] == got["greedy"] == got["in_memory"] == got["beam1"], name
        for beam, greedy, rescored in zip(got["beam3_scores"], got["greedy_scores"],
                                          got["beam3_rescored"]):
            assert beam >= greedy - SCORE_SLACK, (name, beam, greedy)
            assert abs(beam - rescored) <= SCORE_SLACK, (name, beam, rescored)
        with open(tmp_path / f"{name}_greedy.jsonl") as f:
            tool_greedy = [json.loads(line) for line in f]
        with open(tmp_path / f"{name}_beam3.jsonl") as f:
            tool_beam = [json.loads(line) for line in f]
        assert [r["ids"] for r in tool_greedy] == got["megatron"], name
        assert [r["ids"] for r in tool_beam] == got["beam3"], name
        print(f"{name}: {got['num_image_tokens']} of {got['num_patches']} patches read; "
              f"greedy log p {np.round(got['greedy_scores'], 3).tolist()}, beam 3 "
              f"{np.round(got['beam3_scores'], 3).tolist()}; ids {got['megatron'][0][:8]}...")
        assert got["num_image_tokens"] == got["expected_image_tokens"], name
