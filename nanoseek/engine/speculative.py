"""MTP speculative decoding: the checkpoint's Multi-Token Prediction module drafts the next tokens, the main
model verifies them all in its next forward, and the standard rule decides what is kept (Leviathan et al. 2023;
what vLLM and SGLang run for DeepSeek-V3's MTP).

One step of a speculating sequence: the main model computes its last token and the k draft tokens after it in
one forward (k + 1 rows, each with next-token logits); `accept` keeps the longest prefix of the draft the target
agrees with and adds one token of its own (a correction, or a bonus when all k were kept), so 1..k+1 tokens per
step. Greedy: a draft token is kept iff it is the target's argmax, so the output is plain greedy decoding's.
Sampling: draft token d drawn from q is kept with probability min(1, p(d) / q(d)), else the token is drawn from
max(0, p - q) renormalised -- the output keeps the target distribution p exactly. p and q are both the
request's processed distribution (temperature, top-k, top-p, min-p) of the target's and the draft's logits.

The engine then runs the MTP module over the positions the step settled (it keeps its own paged cache layer)
and drafts from its last row; for k > 1 it drafts further by feeding the module its own output state, as vLLM
does with a single MTP layer. Requests whose sampling needs the history token by token (penalties, logits
processors, min_tokens, logprobs) and n > 1 requests decode plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .sampler import Sampler
from .sequence import Sequence


@dataclass(frozen=True)
class Speculation:
    method: str  # "mtp"
    num_tokens: int  # k, draft tokens per step

    @classmethod
    def make(cls, method: str | None, num_tokens: int | None, model) -> "Speculation | None":
        if method is None:
            if num_tokens:
                raise ConfigError("num_speculative_tokens needs speculative='mtp'")
            return None
        if method != "mtp":
            raise ConfigError(f"unknown speculative method {method!r}: the engine drafts with 'mtp'")
        k = 1 if num_tokens is None else int(num_tokens)
        if not 1 <= k <= 8:
            raise ConfigError(f"num_speculative_tokens must be in [1, 8], got {num_tokens}")
        if not len(model.mtp):
            raise ConfigError("speculative='mtp' needs a checkpoint with MTP layers (num_nextn_predict_layers >= 1 "
                              "and its model.layers.<num_hidden_layers>.* tensors); this one has none")
        return cls("mtp", k)


def speculates(seq: Sequence) -> bool:
    """Whether a sequence drafts: its next token depends on the logits alone (no penalties, processors,
    logprobs or min_tokens still to enforce) and it is the only sequence of its request."""
    p = seq.params
    return (p.n == 1 and not p.logits_processors and p.logprobs is None and p.repetition_penalty == 1.0
            and not p.frequency_penalty and not p.presence_penalty and seq.num_output >= p.min_tokens)


def processed_probs(sampler: Sampler, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The distribution the sampler draws from for this sequence (temperature, then top-k/top-p/min-p), one
    row per logits row."""
    scaled = logits.float() / seq.params.temperature
    return sampler._truncate(scaled, [seq] * logits.shape[0]).softmax(-1)


def propose(sampler: Sampler, logits: torch.Tensor, seq: Sequence) -> tuple[int, torch.Tensor | None]:
    """A draft token from the MTP module's logits [vocab]: its argmax (greedy requests), or a draw from its
    processed distribution, returned with it."""
    if seq.params.greedy:
        return int(logits.argmax()), None
    q = processed_probs(sampler, logits[None], seq)[0]
    return int(torch.multinomial(q, 1, generator=seq.generator or sampler.generator)), q


def accept(sampler: Sampler, logits: torch.Tensor, seq: Sequence, draft: list[int],
           draft_probs: torch.Tensor | None) -> list[int]:
    """The tokens a verification step appends: logits [k + 1, vocab] are the target's at the last token and at
    each draft token. Returns the accepted draft prefix plus one token from the target."""
    k = len(draft)
    if seq.params.greedy:
        target = logits.argmax(-1).tolist()
        out = []
        for j, d in enumerate(draft):
            if target[j] != d:
                return out + [target[j]]
            out.append(d)
        return out + [target[k]]
    generator = seq.generator or sampler.generator
    p = processed_probs(sampler, logits, seq)
    out = []
    for j, d in enumerate(draft):
        q = draft_probs[j]
        u = torch.rand((), generator=generator).item()
        if u * float(q[d]) < float(p[j, d]):  # u < p(d) / q(d), without dividing by a zero q(d)
            out.append(d)
            continue
        residual = (p[j] - q).clamp(min=0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p[j]
        return out + [int(torch.multinomial(residual, 1, generator=generator))]
    return out + [int(torch.multinomial(p[k], 1, generator=generator))]
