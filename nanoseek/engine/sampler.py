"""Next-token sampling for a batch of sequences, each with its own SamplingParams.

Order (vLLM's): logits processors, min_tokens masking, repetition / frequency / presence penalties,
temperature, then top-k, top-p and min-p truncation, then a draw. A draw is argmax(p / E) with E ~ Exp(1)
noise (equivalent to sampling from p), generated from the sequence's own generator when it is seeded, so a
seeded request is reproducible whatever else shares its batch and consumes no one else's randomness.
"""

from __future__ import annotations

import torch

from .sequence import Sequence


class Sampler:
    def __init__(self, tokenizer=None, seed: int | None = None):
        self.tokenizer = tokenizer
        self.generator = torch.Generator()  # for unseeded requests; never the global generator
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [M, vocab] (row i for seqs[i]) -> one token id per sequence; records logprobs if asked."""
        logits = logits.float()
        raw = logits.clone() if any(s.params.logprobs is not None and s.params.logprobs_mode == "raw"
                                    for s in seqs) else None
        for i, seq in enumerate(seqs):
            p = seq.params
            for proc in p.logits_processors:
                logits[i] = proc(seq.output_ids, logits[i])
            if seq.num_output < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(seq.request.eos_ids))
                if banned:
                    logits[i, banned] = float("-inf")
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.frequency_penalty or p.presence_penalty:
                out = seq.output_ids
                if out:
                    counts = torch.bincount(torch.tensor(out, device=logits.device), minlength=logits.shape[1]).float()
                    logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        tokens = logits.argmax(dim=-1).tolist()  # final for greedy rows
        processed = None
        if any(s.params.logprobs is not None and s.params.logprobs_mode == "processed" for s in seqs):
            temps = torch.tensor([s.params.temperature if s.params.temperature > 0 else 1.0 for s in seqs],
                                 device=logits.device)
            processed = logits / temps[:, None]
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            rows = [seqs[i] for i in sampled]
            temps = torch.tensor([s.params.temperature for s in rows], device=logits.device)
            probs = self._truncate(logits[sampled] / temps[:, None], rows).softmax(dim=-1)
            for j, i in enumerate(sampled):
                # The noise comes from the request's CPU generator on every device: a seeded request draws
                # the same tokens on CPU and GPU.
                noise = torch.empty(probs.shape[1]).exponential_(generator=seqs[i].generator or self.generator)
                noise = noise.to(probs.device)
                tokens[i] = int((probs[j] / noise).argmax())
        for i, seq in enumerate(seqs):
            if seq.params.logprobs is not None:
                source = raw if seq.params.logprobs_mode == "raw" else processed
                seq.logprobs.append(self._logprob_entry(source[i].log_softmax(-1), tokens[i], seq.params.logprobs))
        return tokens

    @staticmethod
    def _truncate(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        top_k = [s.params.top_k for s in seqs]
        if any(top_k):
            for i, k in enumerate(top_k):
                if 0 < k < logits.shape[1]:
                    kth = logits[i].topk(k).values[-1]
                    logits[i] = logits[i].masked_fill(logits[i] < kth, float("-inf"))
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        if (top_p < 1).any():
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token when the tokens before it already reach top_p (the first token always stays).
            drop = (cumulative - sorted_logits.softmax(-1)) >= top_p[:, None]
            drop[:, 0] = False
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        min_p = torch.tensor([s.params.min_p for s in seqs], device=logits.device)
        if (min_p > 0).any():
            probs = logits.softmax(-1)
            floor = probs.max(-1, keepdim=True).values * min_p[:, None]
            logits = logits.masked_fill(probs < floor, float("-inf"))
        return logits

    def _logprob_entry(self, logprobs: torch.Tensor, token: int, k: int) -> dict:
        entry = self._describe(token, float(logprobs[token]))
        if k:
            values, ids = logprobs.topk(k)
            entry["top_logprobs"] = [self._describe(int(t), float(v)) for v, t in zip(values, ids)]
        else:
            entry["top_logprobs"] = []
        return entry

    def _describe(self, token: int, logprob: float) -> dict:
        """OpenAI's shape: token text, logprob, and the token's UTF-8 bytes."""
        if self.tokenizer is None:
            return {"token_id": token, "token": str(token), "logprob": logprob, "bytes": None}
        raw = self.tokenizer.token_bytes(token)
        return {"token_id": token, "token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}
