"""MTP speculative decoding (engine/speculative.py): greedy output identical to plain decoding, sampled output
keeping the target distribution, with batching, prefix caching and preemption; acceptance in the metrics."""

import pytest
import torch

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.config import ModelConfig
from nanoseek.engine import llm as engine_module
from nanoseek.engine import speculative
from nanoseek.engine.sampler import Sampler
from nanoseek.errors import ConfigError
from nanoseek.model.transformer import Transformer
from nanoseek.serve.metrics import ServerMetrics

from tiny import randomize_

PROMPTS = [[5, 9, 13, 2, 7], [40, 41, 42], [3, 1, 4, 1, 5, 9, 2, 6], [5, 9, 13, 2, 7, 8]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory, hf_checkpoint):
    """A V3 checkpoint with one MTP layer (random weights: its own drafts are almost never right)."""
    directory, _ = hf_checkpoint("deepseek_v3")
    config = ModelConfig.from_pretrained(directory).replace(num_nextn_predict_layers=1)
    model = Transformer(config)
    randomize_(model, seed=5)
    return nanoseek.save_model(model, tmp_path_factory.mktemp("spec") / "mtp")


def outputs(llm, prompts=PROMPTS, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


class Oracle:
    """Drafts the plain greedy continuation, wrong at every `wrong`-th draft: acceptance, partial acceptance and
    rejection all happen, which a random MTP module alone would not give."""

    def __init__(self, prompts, continuations, wrong: int):
        self.future = {tuple(p): p + c for p, c in zip(prompts, continuations)}
        self.wrong, self.calls = wrong, 0

    def __call__(self, sampler, logits, seq):
        self.calls += 1
        full = self.future[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        at = len(seq.token_ids) + len(seq.draft)
        token = full[at] if at < len(full) else 0
        if self.calls % self.wrong == 0:
            token = (token + 1) % 150  # a wrong draft, still a valid token id (vocab 160)
        return token, None


@pytest.mark.parametrize("k,dtype", [(1, "float32"), (3, "float32"), (2, "bfloat16")])
def test_greedy_output_is_plain_decoding_s(mtp_checkpoint, monkeypatch, k, dtype):
    plain = outputs(LLM(mtp_checkpoint, dtype=dtype))
    llm = LLM(mtp_checkpoint, dtype=dtype, speculative="mtp", num_speculative_tokens=k)
    assert outputs(llm) == plain  # the module's own (random) drafts: mostly rejected
    assert llm.engine.totals["spec_draft_tokens"] > 0
    oracle = Oracle(PROMPTS, plain, wrong=5)
    monkeypatch.setattr(engine_module, "propose", oracle)
    llm = LLM(mtp_checkpoint, dtype=dtype, speculative="mtp", num_speculative_tokens=k)
    results = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in results] == plain
    totals = llm.engine.totals
    assert 0.5 < totals["spec_accepted_tokens"] / totals["spec_draft_tokens"] < 1.0
    assert all(o.metrics.spec_draft_tokens > 0 and o.metrics.spec_accepted_tokens > 0 for o in results)
    steps = sum(len(set(o.metrics.token_times)) for o in results)
    assert steps < sum(len(p) for p in plain)  # several tokens per step
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks  # everything released


def test_stops_inside_accepted_drafts_and_max_tokens(mtp_checkpoint, monkeypatch):
    plain_llm = LLM(mtp_checkpoint, dtype="float32")
    full = outputs(plain_llm, params=SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    stop_token = full[0][9]
    params = SamplingParams(temperature=0, max_tokens=17, stop_token_ids=[stop_token])
    plain = [o.outputs[0] for o in plain_llm.generate(PROMPTS, params)]
    monkeypatch.setattr(engine_module, "propose", Oracle(PROMPTS, full, wrong=10 ** 6))
    llm = LLM(mtp_checkpoint, dtype="float32", speculative="mtp", num_speculative_tokens=4)
    got = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in plain]
    assert got[0].finish_reason == "stop" and got[0].token_ids[-1] == stop_token and len(got[0].token_ids) <= 10
    assert all(len(o.token_ids) <= 17 for o in got)


def test_prefix_caching_and_preemption_keep_the_output(mtp_checkpoint, monkeypatch):
    plain = outputs(LLM(mtp_checkpoint, dtype="float32"))
    monkeypatch.setattr(engine_module, "propose", Oracle(PROMPTS, plain, wrong=3))
    # A cache of 6 blocks of 4 tokens for 4 sequences of up to 32 tokens: preemptions must happen.
    per_token = LLM(mtp_checkpoint, dtype="float32", speculative="mtp").engine.kv_bytes_per_token
    llm = LLM(mtp_checkpoint, dtype="float32", speculative="mtp", num_speculative_tokens=2, block_size=4,
              kv_cache_memory=per_token * 4 * 12)
    assert outputs(llm) == plain
    assert llm.engine.scheduler.num_preemptions > 0
    assert outputs(llm) == plain  # again, now through the prefix cache
    assert llm.engine.totals["prompt_cache_hit_tokens"] > 0


def test_sampled_acceptance_keeps_the_target_distribution():
    """accept() with drafts drawn from q emits tokens distributed as p, whatever q (the rejection rule)."""
    torch.manual_seed(0)
    vocab, k, draws = 6, 2, 20000
    target, draft = torch.randn(k + 1, vocab) * 1.5, torch.randn(k, vocab) * 1.5
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1)

    class Seq:  # what accept() reads of a sequence
        generator = torch.Generator().manual_seed(3)

    seq = Seq()
    seq.params = params
    sampler = Sampler()
    p = speculative.processed_probs(sampler, target, seq)
    q = speculative.processed_probs(sampler, draft, seq)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab, vocab)
    for _ in range(draws):
        d = [int(torch.multinomial(q[j], 1, generator=seq.generator)) for j in range(k)]
        out = speculative.accept(sampler, target, seq, d, q)
        first[out[0]] += 1
        if len(out) > 1:  # the second token is p's only where the first was the accepted draft
            second[out[0], out[1]] += 1
    tv = 0.5 * (first / draws - p[0]).abs().sum()
    assert tv < 0.02, (first / draws, p[0])
    row = int(second.sum(1).argmax())  # a first token that was often accepted: its follower must follow p[1]
    follow = second[row] / second[row].sum()
    assert 0.5 * (follow - p[1]).abs().sum() < 0.05
    assert (first[p[0] == 0] == 0).all()  # truncated tokens never come out


def test_sampled_generation_runs_and_is_reproducible(mtp_checkpoint):
    params = SamplingParams(temperature=1.0, top_k=20, max_tokens=16, seed=7, ignore_eos=True)
    llm = LLM(mtp_checkpoint, dtype="float32", speculative="mtp", num_speculative_tokens=2)
    first, again = outputs(llm, params=params), outputs(llm, params=params)
    assert first == again and all(len(o) == 16 for o in first)
    assert llm.engine.totals["spec_draft_tokens"] > 0


def test_requests_that_need_the_history_decode_plainly(mtp_checkpoint):
    llm = LLM(mtp_checkpoint, dtype="float32", speculative="mtp")
    params = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3, logprobs=2, ignore_eos=True)
    plain = outputs(LLM(mtp_checkpoint, dtype="float32"), params=params)
    assert outputs(llm, params=params) == plain
    assert llm.engine.totals["spec_draft_tokens"] == 0


def test_acceptance_in_metrics_and_bad_settings(mtp_checkpoint, hf_checkpoint):
    llm = LLM(mtp_checkpoint, dtype="float32", speculative="mtp")
    llm.generate(PROMPTS[:1], GREEDY)
    stats = llm.engine.stats()
    assert stats["spec_draft_tokens"] > 0
    text = ServerMetrics().render(stats).decode()
    assert f"nanoseek_spec_draft_tokens_total {float(stats['spec_draft_tokens'])}" in text
    assert "nanoseek_spec_acceptance_rate" in text
    plain_dir, _ = hf_checkpoint("deepseek_v3")
    with pytest.raises(ConfigError, match="needs a checkpoint with MTP layers"):
        LLM(plain_dir, speculative="mtp")
    with pytest.raises(ConfigError, match="unknown speculative method 'eagle'"):
        LLM(mtp_checkpoint, speculative="eagle")
    with pytest.raises(ConfigError, match=r"num_speculative_tokens must be in \[1, 8\]"):
        LLM(mtp_checkpoint, speculative="mtp", num_speculative_tokens=0)


def test_cli_generate_with_speculation_matches_plain(chat_checkpoint, tmp_path):
    import json
    import sys

    import procs

    directory, _ = chat_checkpoint("deepseek_v3")
    config = ModelConfig.from_pretrained(directory).replace(num_nextn_predict_layers=1)
    model = Transformer(config)
    randomize_(model, seed=9)
    out = nanoseek.save_model(model, tmp_path / "chat-mtp", tokenizer_from=directory)
    base = [sys.executable, "-m", "nanoseek.cli", "generate", "--model", str(out), "--prompt", "The quick brown",
            "--max-tokens", "12", "--temperature", "0", "--ignore-eos", "--json"]
    plain = procs.run(base, capture_output=True, text=True)
    spec = procs.run(base + ["--speculative", "mtp", "--num-speculative-tokens", "2"], capture_output=True, text=True)
    assert plain.returncode == 0 and spec.returncode == 0, plain.stderr[-800:] + spec.stderr[-800:]
    assert json.loads(spec.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    bad = procs.run(base + ["--model", str(directory), "--speculative", "mtp"], capture_output=True, text=True)
    assert bad.returncode == 2 and "needs a checkpoint with MTP layers" in bad.stderr and "Traceback" not in bad.stderr
