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
        self._token_text: dict[int, tuple[str, bytes]] = {}  # token id -> (text, bytes), for logprob entries
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
        tokens = logits.argmax(dim=-1)  # final for greedy rows
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            rows = [seqs[i] for i in sampled]
            temps = torch.tensor([s.params.temperature for s in rows], device=logits.device)
            probs = self._truncate(logits[sampled] / temps[:, None], rows).softmax(dim=-1)
            # The noise comes from each request's CPU generator on every device (a seeded request draws the
            # same tokens on CPU and GPU, whatever shares its batch); one row each, then one batched draw.
            noise = torch.empty(probs.shape)
            for j, seq in enumerate(rows):
                noise[j].exponential_(generator=seq.generator or self.generator)
            tokens[sampled] = (probs / noise.to(probs.device)).argmax(dim=-1)
        tokens = tokens.tolist()
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wanted:
            self._record_logprobs(logits, raw, seqs, wanted, tokens)
        return tokens

    def _record_logprobs(self, logits, raw, seqs: list[Sequence], wanted: list[int], tokens: list[int]) -> None:
        """Appends each asking sequence's logprob entry: the chosen token's (and the top-k) log-probabilities of
        the raw logits or of the processed ones (after penalties, at the request's temperature)."""
        by_mode: dict[str, torch.Tensor] = {}
        for mode in {seqs[i].params.logprobs_mode for i in wanted}:
            if mode == "raw":
                source = raw[wanted]
            else:
                temps = torch.tensor([seqs[i].params.temperature if seqs[i].params.temperature > 0 else 1.0
                                      for i in wanted], device=logits.device)
                source = logits[wanted] / temps[:, None]
            by_mode[mode] = source.log_softmax(-1)
        chosen = torch.tensor([tokens[i] for i in wanted], device=logits.device)[:, None]
        top = max(seqs[i].params.logprobs for i in wanted)
        for mode, logprobs in by_mode.items():
            picked = logprobs.gather(1, chosen)[:, 0].tolist()
            values, ids = logprobs.topk(top, dim=-1) if top else (None, None)
            values = values.tolist() if top else None
            ids = ids.tolist() if top else None
            for j, i in enumerate(wanted):
                seq = seqs[i]
                if seq.params.logprobs_mode != mode:
                    continue
                entry = self._describe(tokens[i], picked[j])
                k = seq.params.logprobs
                entry["top_logprobs"] = [self._describe(t, v) for t, v in zip(ids[j][:k], values[j][:k])] if k else []
                seq.logprobs.append(entry)

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

    def _describe(self, token: int, logprob: float) -> dict:
        """OpenAI's shape: token text, logprob, and the token's UTF-8 bytes."""
        if self.tokenizer is None:
            return {"token_id": token, "token": str(token), "logprob": logprob, "bytes": None}
        text, raw = self._token_text.get(token) or self._token_text.setdefault(token, self._token_form(token))
        return {"token_id": token, "token": text, "logprob": logprob, "bytes": list(raw)}

    def _token_form(self, token: int) -> tuple[str, bytes]:
        raw = self.tokenizer.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), raw
