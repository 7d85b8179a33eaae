"""The engine core (LLMEngine) and its vLLM-style front (LLM).

One step = schedule (scheduler.py) -> one model call over every scheduled token (runner.py) -> sample
(sampler.py) -> update sequences, text and metrics (sequence.py). The engine is thread-safe: add, abort,
update_weights and step take one lock, so the async front (async_llm.py) can step in a background thread.
"""

from __future__ import annotations

import itertools
import re
import logging
import threading
import time
from pathlib import Path

import torch

from ..checkpoint import load_model, model_directory
from ..config import ModelConfig
from ..errors import ConfigError
from ..model import ops, quant
from ..model.transformer import Transformer
from ..runtime import Precision, inference_precision, notify, resolve_device
from ..tokenizer import Tokenizer, load_tokenizer
from .cache import BlockManager, KVCache
from .runner import ModelRunner, Span
from .sampler import Sampler
from .sampling_params import InvalidRequestError, SamplingParams
from .scheduler import Scheduler
from .speculative import Speculation, accept, propose, speculates
from .sequence import Request, RequestOutput, Sequence, Status
from .text import THINK_CLOSE, THINK_OPEN, starts_in_reasoning

log = logging.getLogger("nanoseek.engine")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string like '512MiB', '2GiB', '1.5GB'."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read memory size {value!r}: write e.g. 512MiB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class LLMEngine:
    def __init__(self, model: str | Path | Transformer, tokenizer: Tokenizer | str | Path | None = None, *,
                 device: str | None = "cpu", dtype: str | torch.dtype | Precision = "auto", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, block_size: int = 16, kv_cache_memory: int | str = "1GiB",
                 enable_prefix_caching: bool = True, max_model_len: int | None = None, seed: int | None = None,
                 pack_weights: bool = True, quantization: str | None = None, speculative: str | None = None,
                 num_speculative_tokens: int | None = None):
        if isinstance(model, Transformer):
            self.model = model.eval()
            source = getattr(model, "checkpoint_dir", None)
        else:
            source = model_directory(model)
            config = ModelConfig.from_pretrained(source)
            dev = resolve_device(device)
            precision = dtype if isinstance(dtype, Precision) else inference_precision(dtype, dev, config.torch_dtype)
            if precision.note:
                notify(precision.note)
            self.model = load_model(source, dev, precision.weights).set_precision(precision.weights,
                                                                                  precision.compute)
        if tokenizer is None and source is not None and (Path(source) / "tokenizer.json").exists():
            tokenizer = source
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        config = self.model.config
        self.config = config
        self.pack_weights = pack_weights
        self._quantize(quantization)
        self.config = config = self.model.config  # quantizing unties a tied LM head
        self._derive_weights()
        self.speculation = Speculation.make(speculative, num_speculative_tokens, self.model)
        # The MTP draft module keeps its own cache layer beside the model's.
        cache_layers = config.num_hidden_layers + (1 if self.speculation else 0)

        slot_shape = self.model.kv_cache_shape()
        # The cache holds what the activations are (float32 where bf16 weights compute in float32): exact.
        cache_dtype = self.model.compute_dtype
        self.kv_bytes_per_token = KVCache.bytes_per_token(cache_layers, slot_shape, cache_dtype)
        budget = parse_memory(kv_cache_memory)
        num_blocks = budget // (self.kv_bytes_per_token * block_size)
        if num_blocks < 2:
            raise ConfigError(f"kv_cache_memory {budget:,} bytes holds fewer than 2 blocks of {block_size} tokens "
                              f"({self.kv_bytes_per_token:,} bytes per token): raise kv_cache_memory")
        self.cache = KVCache(cache_layers, num_blocks, block_size, slot_shape, cache_dtype,
                             self.model.device)
        self.max_cached_tokens = num_blocks * block_size
        limit = min(config.max_position_embeddings, self.max_cached_tokens)
        if max_model_len is not None and max_model_len > limit:
            raise ConfigError(f"max_model_len {max_model_len} exceeds what fits: {limit} tokens (cache holds "
                              f"{self.max_cached_tokens}, model {config.max_position_embeddings})")
        self.max_model_len = max_model_len or limit
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache, config.num_hidden_layers)
        self.sampler = Sampler(self.tokenizer, seed)
        self.requests: dict[str, Request] = {}
        self.lock = threading.RLock()
        self._ids = itertools.count()
        self._finished_outputs: list[RequestOutput] = []
        self.eos_ids = set(config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        if source is not None and (Path(source) / "generation_config.json").exists():
            import json

            eos = json.loads((Path(source) / "generation_config.json").read_text()).get("eos_token_id")
            self.eos_ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.reasoning = self.tokenizer is not None and self.tokenizer.token_to_id(THINK_CLOSE) is not None
        self.suspects: dict[str, Request] = {}  # requests in a batch that faulted, each to be run alone
        self.totals = {"prompt_tokens": 0, "prompt_cache_hit_tokens": 0, "generation_tokens": 0, "requests": 0,
                       "requests_aborted": 0, "requests_failed": 0, "spec_draft_tokens": 0,
                       "spec_accepted_tokens": 0}

    # ---- requests ----
    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """A string, a list of token ids, or a chat (list of {"role", "content"}) -> (text, ids)."""
        if isinstance(prompt, str):
            self._need_tokenizer()
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            self._need_tokenizer()
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError("prompt must be a string, a list of token ids or a list of chat messages")

    def _prompt_leaves_think_open(self, ids: list[int]) -> bool:
        """Whether generation starts inside a <think> block: the prompt's last think tag is an opening one (R1's
        template ends with `<think>\n`; a prefix completion may end inside a long reasoning prefix). By token id
        where the tags are single tokens, else from the text of the prompt's tail."""
        tags = (self.tokenizer.token_to_id(THINK_OPEN), self.tokenizer.token_to_id(THINK_CLOSE))
        if None in tags:
            return starts_in_reasoning(self.tokenizer.decode(ids[-8:]))
        for token in reversed(ids):
            if token in tags:
                return token == tags[0]
        return False

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer.json: pass prompts as token ids")

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None) -> Request:
        """Validates, tokenizes and queues a request; raises InvalidRequestError with a clear message."""
        return self.add(self.make_request(prompt, params, request_id, arrival_time))

    def make_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     arrival_time: float | None = None) -> Request:
        """Everything about adding a request that needs no lock (so callers on other threads never wait for a
        running step): validation, tokenization, the Request object."""
        params = params or SamplingParams()
        if params.n > self.scheduler.max_num_seqs:
            raise InvalidRequestError(f"n={params.n} exceeds this engine's max_num_seqs {self.scheduler.max_num_seqs}: "
                                      "ask for fewer samples")
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty: give at least one token")
        vocab = self.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens but this engine's context is "
                                      f"{self.max_model_len} (KV cache and model limit): shorten the prompt")
        in_reasoning = self.reasoning and self._prompt_leaves_think_open(ids)
        skip = set()
        if self.tokenizer is not None and params.skip_special_tokens:
            keep = {self.tokenizer.token_to_id(THINK_OPEN), self.tokenizer.token_to_id(THINK_CLOSE)}
            skip = self.tokenizer.special_ids - keep
        request_id = request_id or f"req-{next(self._ids)}"
        return Request(request_id, text, ids, params, self.tokenizer, self.eos_ids, self.max_model_len, skip,
                       self.reasoning, in_reasoning, arrival_time)

    def add(self, request: Request) -> Request:
        with self.lock:
            if request.request_id in self.requests:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            self.requests[request.request_id] = request
            self.scheduler.add(request.seqs[0])
            self.totals["requests"] += 1
        return request

    def abort(self, request_id: str) -> bool:
        """Stops a request now and frees its cache blocks. Returns False if it is unknown or already done."""
        with self.lock:
            request = self.requests.pop(request_id, None)
            if request is None:
                return False
            request.aborted = True
            self.totals["requests_aborted"] += 1
            for seq in request.seqs:
                if not seq.finished:
                    self.scheduler.remove(seq)
                    seq.finish("abort", None)
            self._finished_outputs.append(request.output())
            return True

    def recover(self) -> None:
        """After a failure outside any one request (the async engine's watchdog): with every request gone, a
        fresh block manager and scheduler over the same cache tensors, so no half-updated bookkeeping
        survives. The prefix cache starts empty."""
        with self.lock:
            self.requests.clear()
            self.suspects.clear()
            self._finished_outputs = []
            old = self.scheduler
            blocks = self.blocks
            self.blocks = BlockManager(blocks.num_blocks, blocks.block_size, blocks.enable_prefix_caching)
            self.scheduler = Scheduler(self.blocks, old.max_num_seqs, old.max_num_batched_tokens)
            self.scheduler.num_preemptions = old.num_preemptions

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._finished_outputs)

    # ---- stepping ----
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Runs one scheduled batch; returns outputs of every request that changed (finished ones included), or
        with `finished_only` of those that finished (offline generation: no per-step copies of growing
        outputs)."""
        with self.lock:
            outputs, self._finished_outputs = self._finished_outputs, []
            for request_id in [r for r in self.suspects if r not in self.requests]:
                del self.suspects[request_id]
            suspect = next(iter(self.suspects.values()), None)
            plan = self.scheduler.schedule(only=suspect)
            if not plan and suspect is not None:  # no room for it alone now: back to normal batches
                self.suspects.clear()
                plan = self.scheduler.schedule()
            if not plan:
                return outputs
            try:
                outputs += self._run_plan(plan, finished_only)
            except Exception as e:
                return outputs + self._after_fault(plan, e)
            if suspect is not None:  # it ran alone without fault: not the cause
                self.suspects.pop(suspect.request_id, None)
            return outputs

    def _after_fault(self, plan, error: Exception) -> list[RequestOutput]:
        """A fault inside a step. A request that ran alone when it happened caused it: it ends with
        finish_reason "error" and frees its blocks. A batch of several is not condemned together: each request is
        recomputed alone (its sequences preempted) until the one that faults again is found; a one-off fault
        thus costs a recomputation, not anyone's answer. The engine goes on either way."""
        failed = list({item.seq.request.request_id: item.seq.request for item in plan}.values())
        if len(failed) == 1:
            request = failed[0]
            log.error("engine step failed on request %s alone: failing it", request.request_id, exc_info=error)
            self.suspects.pop(request.request_id, None)
            return [self._fail(request, f"{type(error).__name__}: {error}")]
        log.warning("engine step failed on a batch of %d requests: running each alone to find the cause",
                    len(failed), exc_info=error)
        for request in failed:
            self.suspects[request.request_id] = request
            for seq in request.seqs:
                if not seq.finished and seq in self.scheduler.running:
                    self.scheduler.preempt(seq)
        return []

    def _fail(self, request: Request, error: str) -> RequestOutput:
        request.error = error
        self.requests.pop(request.request_id, None)
        self.totals["requests_failed"] += 1
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.finish("error", None)
        return request.output()

    def _run_plan(self, plan, finished_only: bool) -> list[RequestOutput]:
        """The forward pass of one scheduled batch, then sampling (or verifying drafts), forks, bookkeeping and,
        with MTP speculation, the next drafts."""
        outputs = []
        if self.speculation:
            logits, hidden = self.runner.run(plan, return_hidden=True)
        else:
            logits, hidden = self.runner.run(plan), None
        samples = [item.samples for item in plan]  # read before the sequences advance
        # The cache now holds the K/V of every computed token. Newly completed blocks are hashed before a sequence
        # that finishes this step releases them, and before a parent forks (its siblings share its full blocks).
        # Of a verified draft only the accepted part counts (the rejected tokens' slots are overwritten later):
        # those sequences advance once accepted.
        starts = {}
        for item in plan:
            seq = item.seq
            starts[id(seq)] = seq.num_computed
            if not item.draft:
                self._advance(seq, item.num_new)
        # Logits rows: one per sampling sequence, 1 + len(draft) for one verifying drafts.
        seqs, rows, verifying, row = [], [], [], 0
        for item, sampled in zip(plan, samples):
            if not sampled:
                continue
            if item.draft:
                verifying.append((item, row))
                row += 1 + len(item.draft)
                continue
            seqs.append(item.seq)
            rows.append(row)
            if not item.seq.request.forked:
                for child in self._fork(item.seq):
                    seqs.append(child)
                    rows.append(row)
            row += 1
        tokens = self.sampler.sample(logits[rows], seqs) if seqs else []
        appended: list[tuple[Sequence, list[int]]] = [(seq, [token]) for seq, token in zip(seqs, tokens)]
        for item, first in verifying:
            kept = accept(self.sampler, logits[first:first + 1 + len(item.draft)], item.seq, item.draft,
                          item.draft_probs)
            metrics = item.seq.request.metrics
            metrics.spec_draft_tokens += len(item.draft)
            metrics.spec_accepted_tokens += len(kept) - 1
            self.totals["spec_draft_tokens"] += len(item.draft)
            self.totals["spec_accepted_tokens"] += len(kept) - 1
            appended.append((item.seq, kept))
        now = time.monotonic()
        touched: dict[str, Request] = {}
        generated, valid = 0, {}
        for seq, kept in appended:
            count = 0
            for token in kept:
                seq.append(token)
                count += 1
                seq.request.metrics.token_times.append(now)
                if seq.finished:
                    break
            generated += count
            valid[id(seq)] = min(len(kept) - 1, count)  # accepted draft tokens that made it into the sequence
            metrics = seq.request.metrics
            metrics.first_token_time = metrics.first_token_time or now
            touched[seq.request.request_id] = seq.request
        for item, _ in verifying:  # the last token, then the accepted drafts that made it into the sequence
            self._advance(item.seq, 1 + valid[id(item.seq)])
        for seq, _ in appended:
            if seq.finished:
                self.scheduler.remove(seq)
        if self.speculation:
            self._draft(plan, hidden, starts)
        self.totals["generation_tokens"] += generated
        for request in touched.values():
            if request.finished or not finished_only:
                outputs.append(request.output())
            if request.finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)
                self.totals["prompt_tokens"] += len(request.prompt_token_ids)
                self.totals["prompt_cache_hit_tokens"] += request.metrics.prompt_cache_hit_tokens
        return outputs

    def _advance(self, seq: Sequence, computed: int) -> None:
        """`computed` more tokens of seq have their K/V in the cache; blocks this completes join the prefix cache."""
        before = seq.num_computed
        seq.num_computed += computed
        bs = self.blocks.block_size
        if seq.num_computed // bs > before // bs:
            self.blocks.register_computed(seq.token_ids, seq.block_table, seq.num_computed)

    def _draft(self, plan, hidden: torch.Tensor, starts: dict[int, int]) -> None:
        """MTP speculation after a step: the draft module runs over the positions each live sequence settled
        (so its cache layer stays complete, prefills included), and each sequence that now waits on its next
        token and `speculates` gets up to k draft tokens, the first from the main model's last hidden state,
        the next ones from the module's own output (vLLM's way with one MTP layer)."""
        spans, rows, drafting, row = [], [], [], 0
        for item in plan:
            seq, start = item.seq, starts[id(item.seq)]
            settled = seq.num_computed - start
            if seq.status == Status.RUNNING and settled > 0:
                wants = speculates(seq) and len(seq.token_ids) - seq.num_computed == 1 and self._room(seq) > 0
                spans.append(Span(seq.block_table, start, seq.token_ids[start + 1:start + settled + 1],
                                  "last" if wants else "none", as_decodes=settled <= 1 + self.speculation.num_tokens))
                rows.extend(range(row, row + settled))
                if wants:
                    drafting.append((seq, len(rows) - 1))
            row += item.num_new
        if not spans:
            return
        states, logits = self.runner.run_mtp(spans, hidden[rows])
        proposals = []
        for m, (seq, last_row) in enumerate(drafting):
            token, probs = propose(self.sampler, logits[m], seq)
            seq.draft, seq.draft_probs = [token], None if probs is None else [probs]
            proposals.append((seq, states[last_row]))
        for _ in range(1, self.speculation.num_tokens):
            # One more draft each: position p = the pending token's, the module's last state as its hidden.
            proposals = [(seq, h) for seq, h in proposals if len(seq.draft) < self._room(seq)
                         and self.blocks.can_grow(seq.block_table, seq.num_computed + 1 + len(seq.draft))]
            if not proposals:
                break
            spans = []
            for seq, _ in proposals:
                self.blocks.grow(seq.block_table, seq.num_computed + 1 + len(seq.draft))
                p = seq.num_computed + len(seq.draft) - 1
                spans.append(Span(seq.block_table, p, [seq.draft[-1]], "last"))
            states, logits = self.runner.run_mtp(spans, torch.stack([h for _, h in proposals]))
            for m, (seq, _) in enumerate(proposals):
                token, probs = propose(self.sampler, logits[m], seq)
                seq.draft.append(token)
                if probs is not None:
                    seq.draft_probs.append(probs)
                proposals[m] = (seq, states[m])
        for seq, _ in drafting:
            if seq.draft_probs is not None:
                seq.draft_probs = torch.stack(seq.draft_probs)

    def _room(self, seq: Sequence) -> int:
        """Draft tokens a sequence may verify next step: at most k, and never past its max_tokens (the step adds a
        token of the target's own) or the context length."""
        left = min(seq.request.max_tokens - seq.num_output, seq.request.max_model_len - len(seq.token_ids))
        return max(0, min(self.speculation.num_tokens, left - 1))

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """n > 1: the first sequence finished the prompt; its siblings share the prompt's full blocks."""
        request = parent.request
        request.forked = True
        children = []
        for i in range(1, request.params.n):
            child = Sequence(request, i, parent.token_ids, request.generator_for(i))
            child.block_table = self.blocks.fork(parent.block_table, parent.num_computed)
            child.num_computed = len(child.block_table) * self.blocks.block_size
            request.seqs.append(child)
            self.scheduler.add_running(child, after=children[-1] if children else parent)
            children.append(child)
        return children

    # ---- weights ----
    def update_weights(self, weights: torch.nn.Module | dict[str, torch.Tensor]) -> None:
        """Loads new weights (a model or its state_dict, nanoseek names) without touching disk. Every cached
        block is dropped, the prefix cache included, and running sequences are recomputed with the new weights;
        derived tensors (packed copies, absorbed MLA projections) are rebuilt."""
        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        own = self.model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ConfigError(f"update_weights: {len(missing)} missing ({', '.join(missing[:5])}) and "
                              f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])}) tensors")
        with self.lock, torch.no_grad():
            for name, tensor in own.items():
                src = state[name]
                if src.shape != tensor.shape:
                    raise ConfigError(f"update_weights: {name} has shape {list(src.shape)}, "
                                      f"expected {list(tensor.shape)}")
                tensor.copy_(src.detach().to(tensor.device, tensor.dtype))
            if self.quantization is not None:  # new float weights: quantized like the ones they replace
                quant.quantize_model(self.model, self.quantization)
            self._derive_weights()
            self.scheduler.preempt_all()
            self.blocks.reset_prefix_cache()

    def _quantize(self, quantization: str | None) -> None:
        """Weight-only quantization (model/quant.py): of the float model as asked, or as the checkpoint was
        quantized by `nanoseek quantize` (asking for another scheme than the checkpoint's is an error)."""
        asked = quant.scheme(quantization)
        loaded = getattr(self.model, "quantization", None)
        if asked is not None and loaded is not None and asked != loaded:
            raise ConfigError(f"the checkpoint is already quantized as {loaded.name}: drop --quantization "
                              f"{asked.name}, or quantize the float checkpoint")
        if asked is not None and loaded is None:
            quant.quantize_model(self.model, asked)
        self.quantization = asked or loaded

    def _derive_weights(self) -> None:
        """(Re)builds every tensor computed from the weights: absorbed MLA projections, packed CPU kernels."""
        ops.derive_weights(self.model, "auto" if self.pack_weights else None)

    # ---- observability ----
    def stats(self) -> dict:
        """A lock-free snapshot (read from other threads while a step runs: values may be one step apart)."""
        return {
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "kv_cache_usage": self.blocks.usage(),
            "num_free_blocks": self.blocks.num_free,
            "num_blocks": self.blocks.num_blocks,
            "block_size": self.blocks.block_size,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_cached_tokens": self.max_cached_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            **self.totals,
        }


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and (isinstance(prompts[0], int) or isinstance(prompts[0], dict)):
        return [prompts]
    return list(prompts)


class LLM:
    """vLLM-style offline interface: LLM(path, **engine options).generate(prompts, SamplingParams(...))."""

    def __init__(self, model, tokenizer=None, **engine_options):
        self.engine = LLMEngine(model, tokenizer, **engine_options)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, token ids or chat messages, or a list of them. One RequestOutput per prompt."""
        prompts = _as_prompt_list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError("give one SamplingParams, or one per prompt")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        requests = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        order = {r.request_id: i for i, r in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="req")
        try:
            while any(r is None for r in results):
                for out in self.engine.step(finished_only=True):
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for r in requests:
                self.engine.abort(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results

    def stream(self, prompt, sampling_params: SamplingParams | None = None):
        """Yields cumulative RequestOutputs of one request as it decodes; closing the generator aborts it."""
        request = self.engine.add_request(prompt, sampling_params)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == request.request_id:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort(request.request_id)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = False):
        """messages: one conversation (list of {"role", "content"}) or a list of them."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        return self.generate(list(messages), sampling_params, use_tqdm)

    def update_weights(self, weights) -> None:
        self.engine.update_weights(weights)
