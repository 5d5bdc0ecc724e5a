"""Greedy and beam-search captions from a StandaloneDecoder (caption_decoder_export.py).

Both follow the training layout of models/generation.py: slot 0 is BOS, generation fills
slots 1 .. L-2 (the ones training supervises; slot L-1 stays PAD), a caption ends at its
first EOS and every later slot is PAD. A caption's score is the sum of the log-probabilities
of its generated tokens up to and including EOS (`sequence_log_prob`). Each step re-runs the
decoder on the caption so far (no KV cache): L forwards of b x beam rows, fine for a demo.
"""

from __future__ import annotations

import torch

from ov2_megatron.conversion.caption_decoder_export import StandaloneDecoder


def _start(decoder: StandaloneDecoder, rows: int, device) -> torch.Tensor:
    spec = decoder.spec
    tokens = torch.full((rows, spec.caption_length), spec.pad_id, dtype=torch.long,
                        device=device)
    tokens[:, 0] = spec.bos_id
    return tokens


@torch.no_grad()
def greedy(decoder: StandaloneDecoder, image_tokens: torch.Tensor) -> torch.Tensor:
    """image_tokens [b, k, w_enc] -> token ids [b, L]."""
    spec = decoder.spec
    tokens = _start(decoder, image_tokens.shape[0], image_tokens.device)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for position in range(spec.caption_length - 2):
        logits = decoder.text_logits(image_tokens, tokens[:, :position + 1])[:, position]
        next_token = torch.where(finished, spec.pad_id, logits.argmax(dim=-1))
        tokens[:, position + 1] = next_token
        finished |= next_token == spec.eos_id
        if bool(finished.all()):
            break
    return tokens


@torch.no_grad()
def beam_search(decoder: StandaloneDecoder, image_tokens: torch.Tensor,
                beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image_tokens [b, k, w_enc] -> (best token ids [b, L], their scores [b]).

    Every image keeps `beam` hypotheses; an unfinished one extends by each vocabulary token,
    a finished one (EOS seen) only by PAD at no cost, and the `beam` best by total
    log-probability survive. beam=1 is greedy decoding. Beam search alone can score below
    greedy (a beam may drop the greedy prefix for ones that end worse: it happens on
    near-uniform models), so for beam > 1 the greedy caption competes too and the better of
    the two is returned: a larger beam never gives a less likely caption than greedy."""
    if beam < 1:
        raise ValueError(f"beam size {beam} must be >= 1")
    spec = decoder.spec
    b, device = image_tokens.shape[0], image_tokens.device
    rows = image_tokens.repeat_interleave(beam, dim=0)  # [b * beam, k, w]
    tokens = _start(decoder, b * beam, device)
    scores = torch.full((b, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis at the start: the others are copies of it
    finished = torch.zeros(b * beam, dtype=torch.bool, device=device)
    vocab = spec.vocab_size
    for position in range(spec.caption_length - 2):
        logits = decoder.text_logits(rows, tokens[:, :position + 1])[:, position]
        step = torch.log_softmax(logits.float(), dim=-1)  # [b * beam, vocab]
        done = torch.full_like(step, float("-inf"))
        done[:, spec.pad_id] = 0.0  # a finished caption only continues with PAD, for free
        step = torch.where(finished.unsqueeze(1), done, step)
        candidates = (scores.reshape(-1, 1) + step).reshape(b, beam * vocab)
        scores, flat = candidates.topk(beam, dim=-1)  # [b, beam]
        parent = (flat // vocab) + torch.arange(b, device=device).unsqueeze(1) * beam
        tokens = tokens[parent.reshape(-1)]
        tokens[:, position + 1] = (flat % vocab).reshape(-1)
        finished = finished[parent.reshape(-1)] | (tokens[:, position + 1] == spec.eos_id)
        if bool(finished.all()):
            break
    best = scores.argmax(dim=-1)  # [b]
    index = best + torch.arange(b, device=device) * beam
    tokens, scores = tokens[index], scores.gather(1, best.unsqueeze(1)).squeeze(1)
    if beam == 1:
        return tokens, scores
    fallback = greedy(decoder, image_tokens)
    fallback_scores = sequence_log_prob(decoder, image_tokens, fallback)
    better = fallback_scores > scores
    return (torch.where(better.unsqueeze(1), fallback, tokens),
            torch.where(better, fallback_scores, scores))


@torch.no_grad()
def sequence_log_prob(decoder: StandaloneDecoder, image_tokens: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced score of captions tokens [b, L] (as greedy / beam_search return them):
    sum of log p(slot i+1 | slots <= i) over generated slots up to the first EOS -> [b]."""
    spec = decoder.spec
    logp = torch.log_softmax(decoder.text_logits(image_tokens, tokens[:, :-2]).float(), -1)
    targets = tokens[:, 1:-1]  # slots 1 .. L-2
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [b, L-2]
    is_eos = (targets == spec.eos_id).long()
    before_end = (is_eos.cumsum(dim=1) - is_eos) == 0  # up to and including the first EOS
    return (picked * before_end).sum(dim=1)
