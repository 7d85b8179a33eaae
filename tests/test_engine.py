"""The engine: greedy parity with transformers' generate under every scheduling regime, prefix caching,
preemption, sampling reproducibility, stop strings, abort, n > 1, logprobs, weight updates."""

import pytest
import torch

from nanoseek import LLM, SamplingParams
from nanoseek.engine import InvalidRequestError
from nanoseek.errors import ConfigError

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _prompts(vocab=160, lengths=(5, 13, 22, 3)):
    return [torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


def _reference(hf, prompts, max_new_tokens=10):
    """transformers' greedy generate, one prompt at a time (no padding in the reference)."""
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


ENGINE_REGIMES = {
    "plain": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=6),
    "preemption": dict(kv_cache_memory=None, block_size=4),  # cache sized below to force preemption
}


@pytest.mark.parametrize("regime", sorted(ENGINE_REGIMES))
def test_greedy_matches_transformers_generate(arch, regime, hf_checkpoint):
    directory, hf = hf_checkpoint(arch)
    options = dict(ENGINE_REGIMES[regime])
    if regime == "preemption":
        llm = LLM(directory, block_size=4, kv_cache_memory=1 << 20)
        per_token = llm.engine.kv_bytes_per_token
        # Room for ~40 tokens: the four prompts (43 tokens) plus 4 x 10 outputs cannot all be resident.
        options["kv_cache_memory"] = per_token * 40
    llm = LLM(directory, **options)
    prompts = _prompts()
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == _reference(hf, prompts)
    if regime == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_a_bf16_checkpoint_in_the_policy_dtype_follows_transformers(arch, tmp_path):
    """What `--dtype auto` serves for a real (bf16) checkpoint on this CPU: bf16 arithmetic where it is native,
    float32 over bf16 weights elsewhere. Reference: transformers in float32 over the same bf16 weights, fed the
    engine's own greedy tokens. In float32 each token must be transformers' choice and its log-prob agree closely.
    In bf16 a near-tied expert choice may flip (transformers' own bf16 strays up to ~1 nat from its float32 on
    these random MoE models), so the engine's error is measured beside transformers' bf16 error."""
    from tiny import build_hf_model

    from nanoseek.runtime import inference_precision

    hf16 = build_hf_model(arch).to(torch.bfloat16).eval()
    hf16.save_pretrained(tmp_path)
    hf32 = build_hf_model(arch).to(torch.bfloat16).float().eval()  # the same bf16 weights, computed in float32
    llm = LLM(tmp_path)
    policy = inference_precision("auto", torch.device("cpu"), "bfloat16")
    assert (llm.engine.model.dtype, llm.engine.model.compute_dtype) == (policy.weights, policy.compute)
    outs = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0))
    engine_err, hf_err = [], []
    for prompt, out in zip(_prompts(), outs):
        ids, chosen = prompt + out.outputs[0].token_ids, torch.tensor(out.outputs[0].token_ids)[:, None]
        with torch.no_grad():
            ref = hf32(torch.tensor([ids])).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
            peer = hf16(torch.tensor([ids])).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        engine = torch.tensor([step["logprob"] for step in out.outputs[0].logprobs])
        engine_err.append((engine - ref.gather(1, chosen)[:, 0]).abs())
        hf_err.append((peer.gather(1, chosen) - ref.gather(1, chosen))[:, 0].abs())
        if policy.compute == torch.float32:  # float32 arithmetic: transformers' greedy choice, every step
            assert (ref.max(-1).values - ref.gather(1, chosen)[:, 0]).max() < 1e-2
    engine_err, hf_err = torch.cat(engine_err), torch.cat(hf_err)
    if policy.compute == torch.float32:
        assert engine_err.max() < 1e-2
    else:
        assert engine_err.mean() <= 1.5 * hf_err.mean() + 0.01 and engine_err.max() <= max(hf_err.max(), 0.1) + 0.1


@pytest.mark.parametrize("arch_name", ["deepseek_v3", "deepseek_v32", "llama"])
def test_greedy_matches_transformers_with_prefix_cache_hits(arch_name, hf_checkpoint):
    directory, hf = hf_checkpoint(arch_name)
    llm = LLM(directory, block_size=4)
    shared = _prompts(lengths=(17,))[0]
    prompts = [shared + [7, 8, 9], shared + [11], shared[:9] + [3, 4, 5, 6, 7]]
    first = llm.generate(prompts[:1], GREEDY)[0]
    assert first.metrics.prompt_cache_hit_tokens == 0
    outs = llm.generate(prompts[1:], GREEDY)
    assert [o.metrics.prompt_cache_hit_tokens for o in outs] == [16, 8]
    assert [o.outputs[0].token_ids for o in [first, *outs]] == _reference(hf, prompts)


def test_cache_hit_and_miss_counts_for_a_shared_system_prompt(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    llm = LLM(directory, block_size=8)
    system = {"role": "system", "content": "You are a careful assistant who always explains step by step."}
    chats = [[system, {"role": "user", "content": q}] for q in ("What is 2+2?", "Name a color.", "Hi")]
    first = llm.chat(chats[0], SamplingParams(temperature=0, max_tokens=2))[0]
    m = first.metrics
    assert m.prompt_cache_hit_tokens == 0 and m.prompt_cache_miss_tokens == len(first.prompt_token_ids)
    prefix = llm.tokenizer.apply_chat_template([system], add_generation_prompt=False)
    seen = [first.prompt_token_ids]
    for chat in chats[1:]:
        out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=2))[0]
        ids = out.prompt_token_ids
        hit, miss = out.metrics.prompt_cache_hit_tokens, out.metrics.prompt_cache_miss_tokens
        assert hit + miss == len(ids)
        # Exactly the whole 8-token blocks shared with a prompt seen before (never the block of the last token).
        shared = max(next((i for i, (a, b) in enumerate(zip(ids, old)) if a != b), min(len(ids), len(old)))
                     for old in seen)
        assert hit == min(shared, len(ids) - 1) // 8 * 8 >= len(prefix) // 8 * 8 > 0
        seen.append(ids)


def test_fully_cached_prompt_still_computes_its_last_token(hf_checkpoint):
    directory, hf = hf_checkpoint("deepseek_v3")
    llm = LLM(directory, block_size=4)
    prompt = _prompts(lengths=(16,))[0]
    a = llm.generate([prompt], GREEDY)[0]
    b = llm.generate([prompt], GREEDY)[0]
    assert b.metrics.prompt_cache_hit_tokens == 12  # the last block is recomputed to get logits
    # A request that finishes in its first step still leaves its prompt blocks in the cache.
    other = _prompts(lengths=(9,))[0]
    llm.generate([other], SamplingParams(temperature=0, max_tokens=1))
    assert llm.generate([other], SamplingParams(temperature=0, max_tokens=1))[0].metrics.prompt_cache_hit_tokens == 8
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == _reference(hf, [prompt])[0]


def test_seeded_sampling_is_reproducible_across_batch_compositions(hf_checkpoint):
    directory, _ = hf_checkpoint("deepseek_v3")
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    prompt = _prompts(lengths=(9,))[0]
    alone = LLM(directory).generate([prompt], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True)] * 3
    mixed = LLM(directory).generate(_prompts(lengths=(4, 9, 30)) + [prompt], others + [params])
    assert mixed[-1].outputs[0].token_ids == alone
    different = LLM(directory).generate([prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=12,
                                                                  ignore_eos=True))[0]
    assert different.outputs[0].token_ids != alone


def test_n_samples_share_the_prompt_blocks(hf_checkpoint):
    directory, _ = hf_checkpoint("deepseek_v3")
    llm = LLM(directory, block_size=4)
    prompt = _prompts(lengths=(18,))[0]
    stream = llm.stream(prompt, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=6, ignore_eos=True))
    first = next(stream)
    request = next(iter(llm.engine.requests.values()))
    tables = [s.block_table for s in request.seqs]
    assert len(tables) == 4
    shared = tables[0][:4]  # 18 prompt tokens = 4 full blocks of 4
    assert all(t[:4] == shared for t in tables)
    assert all(llm.engine.blocks.blocks[b].ref_count == 4 for b in shared)
    *_, last = [first, *stream]
    outs = last.outputs
    assert len(outs) == 4 and all(len(o.token_ids) == 6 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_abort_returns_every_block(hf_checkpoint):
    directory, _ = hf_checkpoint("deepseek_v3")
    llm = LLM(directory, block_size=4)
    engine = llm.engine
    free_before = engine.blocks.num_free
    reqs = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in _prompts()]
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < free_before
    for r in reqs:
        assert engine.abort(r.request_id)
    assert engine.blocks.num_free == free_before
    outs = engine.step()
    assert len(outs) == 4 and all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert not engine.has_unfinished()


def test_closing_a_stream_aborts_the_request(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    llm = LLM(directory, block_size=4)
    free = llm.engine.blocks.num_free
    stream = llm.stream(_prompts()[2], SamplingParams(max_tokens=100, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    assert llm.engine.blocks.num_free == free and not llm.engine.requests


def test_stop_strings_never_leak_even_when_streaming(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    llm = LLM(directory)
    prompt = "The quick brown fox"
    free_run = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = free_run.text
    assert len(text) > 10
    stop = text[5:9]  # some text the model will produce
    cut = text.find(stop)
    seen = []
    for out in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])):
        seen.append(out.outputs[0].text)
    assert seen[-1] == text[:cut] and out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert all(stop not in s and text[:cut].startswith(s) for s in seen)  # never shown, never taken back
    with_stop = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop,
                                                    include_stop_str_in_output=True))[0].outputs[0]
    assert with_stop.text == text[:cut] + stop


class SubstringFilter:
    """An output filter (engine.OutputFilter) that cuts at a fixed substring: the shape of the server's policy."""

    def __init__(self, needle: str, holdback: int):
        self.needle, self.holdback, self.calls = needle, holdback, 0

    def find(self, text, searched):
        self.calls += 1
        at = text.find(self.needle, max(0, searched - len(self.needle) + 1))
        return ("needle", at) if at >= 0 else None


def test_an_output_filter_cuts_inside_the_engine_and_never_shows_the_match(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    llm = LLM(directory)
    free_before = llm.engine.blocks.num_free
    prompt = "The quick brown fox"
    text = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0].text
    needle = text[8:14]
    cut = text.find(needle)
    seen = []
    f = SubstringFilter(needle, holdback=len(needle))
    for out in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, output_filter=f)):
        seen.append(out.outputs[0].text)
    o = out.outputs[0]
    assert (o.text, o.finish_reason, o.stop_reason) == (text[:cut], "content_filter", "needle")
    assert all(needle not in s and text[:cut].startswith(s) for s in seen)  # never shown, never taken back
    assert len(seen) > 2 and seen[-2] != seen[-1]  # the text before the match streamed, not all withheld to the end
    assert len(o.token_ids) < 30  # the sequence stopped at the match: no tokens generated past it
    assert llm.engine.blocks.num_free == free_before and not llm.engine.has_unfinished()
    # A filter that never fires leaves the text whole.
    clean = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                output_filter=SubstringFilter("\x00never", 4)))[0].outputs[0]
    assert (clean.text, clean.finish_reason) == (text, "length")


def test_stop_token_ids_and_max_tokens(hf_checkpoint):
    directory, hf = hf_checkpoint("qwen2")
    llm = LLM(directory)
    prompt = _prompts()[1]
    ref = _reference(hf, [prompt], 10)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                stop_token_ids=[ref[3]]))[0].outputs[0]
    first = ref.index(ref[3])
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason == ref[3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == ref[:4] and out.finish_reason == "length"


def test_logprobs_have_openai_shape_and_match_the_model(chat_checkpoint):
    directory, hf = chat_checkpoint("deepseek_v3")
    llm = LLM(directory)
    prompt = llm.tokenizer.encode("What is 12 + 30?")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True))[0]
    lp = out.outputs[0].logprobs
    assert len(lp) == 3
    first = lp[0]
    assert set(first) >= {"token", "logprob", "bytes", "top_logprobs"} and len(first["top_logprobs"]) == 5
    assert first["top_logprobs"][0]["logprob"] == pytest.approx(first["logprob"])  # greedy picked the top one
    assert bytes(first["bytes"]) == llm.tokenizer.token_bytes(out.outputs[0].token_ids[0])
    expected = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    assert first["logprob"] == pytest.approx(expected.max().item(), abs=1e-4)


def test_min_tokens_masks_eos_and_logits_processors_apply(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    llm = LLM(directory)
    eos = 1

    def force_eos(_ids, logits):
        logits[:] = float("-inf")
        logits[eos] = 0.0
        return logits

    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, logits_processors=[force_eos]))
    assert out[0].outputs[0].token_ids == [eos]

    def prefer_eos(_ids, logits):
        logits[eos] += 1000.0
        return logits

    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, min_tokens=4,
                                                   logits_processors=[prefer_eos]))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]


def test_penalties_match_a_reference_greedy_loop(hf_checkpoint):
    """Each greedy token is the argmax of transformers' logits after the penalties (vLLM/OpenAI semantics:
    repetition over prompt and output, frequency and presence over the output), step by step."""
    from transformers import RepetitionPenaltyLogitsProcessor

    directory, hf = hf_checkpoint("llama")
    llm = LLM(directory)

    def reference(prompt, repetition=1.0, frequency=0.0, presence=0.0, steps=12):
        ids = list(prompt)
        for _ in range(steps):
            with torch.no_grad():
                logits = hf(torch.tensor([ids])).logits[:, -1].float()
            if repetition != 1.0:
                logits = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([ids]), logits)
            counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long),
                                    minlength=logits.shape[-1]).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            ids.append(int(logits.argmax()))
        return ids[len(prompt):]

    # The prompt holds the model's own favourite continuation, so a penalty that forgets the prompt shows.
    prompt = [5, 6, 7] + reference([5, 6, 7], steps=6)
    plain = reference(prompt)
    for kwargs in [dict(frequency_penalty=1.5), dict(presence_penalty=1.5), dict(repetition_penalty=3.0)]:
        ref = reference(prompt, kwargs.get("repetition_penalty", 1.0), kwargs.get("frequency_penalty", 0.0),
                        kwargs.get("presence_penalty", 0.0))
        got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **kwargs))
        assert got[0].outputs[0].token_ids == ref, kwargs
        assert ref != plain, f"{kwargs} would not change this model's greedy choices: the test proves nothing"


def test_update_weights_drops_cached_state_and_matches_a_fresh_engine(hf_checkpoint, tmp_path):
    import nanoseek
    from tiny import randomize_

    directory, _ = hf_checkpoint("deepseek_v3")
    llm = LLM(directory, block_size=4)
    prompt = _prompts(lengths=(20,))[0]
    before = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    new = nanoseek.load_model(directory)
    randomize_(new, seed=42)
    running = llm.engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    llm.engine.step()
    llm.update_weights(new)
    assert not llm.engine.blocks.hash_to_block  # prefix cache dropped
    after = llm.generate([prompt], GREEDY)[0]
    assert after.metrics.prompt_cache_hit_tokens == 0
    nanoseek.save_model(new, tmp_path / "new")
    fresh = LLM(tmp_path / "new").generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert after.outputs[0].token_ids == fresh != before
    # The request that was running during the update: its first token came from the old weights; everything
    # after was computed with the new ones (its cached K/V were recomputed, not reused).
    while not running.finished:
        llm.engine.step()
    first = running.seqs[0].output_ids[0]
    assert first == before[0]
    continued = LLM(tmp_path / "new").generate([prompt + [first]], SamplingParams(
        temperature=0, max_tokens=9, ignore_eos=True))[0].outputs[0].token_ids
    assert running.seqs[0].output_ids[1:] == continued


def test_requests_that_can_never_fit_are_rejected_clearly(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    llm = LLM(directory, block_size=4, kv_cache_memory=512 * 32)  # 32 tokens of cache
    assert llm.engine.max_model_len == 32
    with pytest.raises(InvalidRequestError, match="prompt has 40 tokens"):
        llm.generate([[5] * 40], GREEDY)
    out = llm.generate([[5] * 30], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"  # capped by the context
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        LLM(directory, kv_cache_memory="1KiB")


def test_no_deadlock_under_a_random_mix(hf_checkpoint):
    directory, _ = hf_checkpoint("deepseek_v3")
    llm = LLM(directory, block_size=4, kv_cache_memory=288 * 64, max_num_batched_tokens=16, max_num_seqs=5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 160, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(12)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=int(torch.randint(1, 20, (1,), generator=g)),
                             ignore_eos=True, n=1 + i % 3) for i in range(12)]
    outs = llm.generate(prompts, params)
    assert all(o.finished for o in outs)
    assert all(len(c.token_ids) == min(p.max_tokens, 64 - len(pr)) for o, p, pr in zip(outs, params, prompts)
               for c in o.outputs)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_metrics_on_every_output(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    llm = LLM(directory)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    m = out.metrics
    assert m.time_in_queue >= 0 and m.time_to_first_token >= m.time_in_queue
    assert len(m.token_times) == 5 and m.token_times == sorted(m.token_times)
    stats = llm.engine.stats()
    assert stats["num_waiting"] == 0 and stats["num_running"] == 0 and stats["kv_bytes_per_token"] == 512
    assert stats["max_cached_tokens"] == stats["num_blocks"] * stats["block_size"]


def test_offline_generation_reports_finished_requests_only_with_their_full_text(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    llm = LLM(directory)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=9, ignore_eos=True)
    streamed = [out for out in llm.stream("What is 2 + 2?", params)][-1]
    engine = llm.engine
    engine.add_request("What is 2 + 2?", params)
    reported = []
    while engine.has_unfinished():
        reported.extend(engine.step(finished_only=True))
    assert len(reported) == 1 and reported[0].finished
    out = reported[0].outputs[0]
    assert out.token_ids == streamed.outputs[0].token_ids and out.text == streamed.outputs[0].text
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_logprobs_of_requests_asking_different_k_and_modes_in_one_batch(chat_checkpoint):
    directory, hf = chat_checkpoint("deepseek_v3")
    llm = LLM(directory)
    prompt = llm.tokenizer.encode("What is 12 + 30?")
    asks = [SamplingParams(temperature=0, max_tokens=2, logprobs=1, ignore_eos=True),
            SamplingParams(temperature=0.5, seed=1, max_tokens=2, logprobs=3, logprobs_mode="processed",
                           ignore_eos=True),
            SamplingParams(temperature=0.5, seed=1, max_tokens=2, logprobs=0, logprobs_mode="raw", ignore_eos=True)]
    outs = [o.outputs[0] for o in llm.generate([prompt] * 3, asks)]
    assert [len(o.logprobs[0]["top_logprobs"]) for o in outs] == [1, 3, 0]
    logits = hf(torch.tensor([prompt])).logits[0, -1]
    raw, processed = logits.log_softmax(-1), (logits / 0.5).log_softmax(-1)
    assert outs[0].logprobs[0]["logprob"] == pytest.approx(raw.max().item(), abs=1e-4)
    assert outs[1].logprobs[0]["logprob"] == pytest.approx(processed[outs[1].token_ids[0]].item(), abs=1e-4)
    assert outs[2].logprobs[0]["logprob"] == pytest.approx(raw[outs[2].token_ids[0]].item(), abs=1e-4)
    top = outs[1].logprobs[0]["top_logprobs"]
    assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)


def test_forks_count_against_max_num_seqs(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    llm = LLM(directory, max_num_seqs=4)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, ignore_eos=True, seed=1)
    for i, prompt in enumerate(_prompts(lengths=(5, 7, 9))):
        llm.engine.add(llm.engine.make_request(prompt, params, f"r{i}"))
    peak = 0
    while llm.engine.has_unfinished():
        llm.engine.step()
        peak = max(peak, len(llm.engine.scheduler.running))
    assert peak == 3  # one n = 3 request at a time: a second would fork past the cap of 4
    with pytest.raises(InvalidRequestError, match="n=5 exceeds this engine's max_num_seqs 4"):
        llm.engine.make_request([5, 6], SamplingParams(n=5))


def test_seeds_at_the_edges_of_64_bits(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    llm = LLM(directory)
    top = SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=(1 << 64) - 1)  # sibling 1 wraps to seed 0
    out = llm.generate([[5, 6, 7]], top)[0]
    assert len(out.outputs) == 2 and all(len(o.token_ids) == 4 for o in out.outputs)
    for seed in (1 << 64, -(1 << 63) - 1, 1.5, True):
        with pytest.raises(InvalidRequestError, match="seed=.* is out of range"):
            SamplingParams(seed=seed)


def test_a_fault_inside_a_step_fails_its_batch_and_the_engine_goes_on(hf_checkpoint, monkeypatch):
    directory, hf = hf_checkpoint("llama")
    llm = LLM(directory)
    engine = llm.engine
    real_run, calls = engine.runner.run, []

    def faulty(plan):
        calls.append(len(plan))
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return real_run(plan)

    monkeypatch.setattr(engine.runner, "run", faulty)
    engine.add(engine.make_request([5, 6, 7], GREEDY, "victim"))
    outputs = engine.step() + engine.step()  # the second step faults
    failed = [o for o in outputs if o.error]
    assert [o.request_id for o in failed] == ["victim"] and "injected fault" in failed[0].error
    assert failed[0].finished and failed[0].outputs[0].finish_reason == "error"
    assert not engine.requests and engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.stats()["requests_failed"] == 1
    prompt = _prompts(lengths=(5,))[0]
    assert llm.generate([prompt], GREEDY)[0].outputs[0].token_ids == _reference(hf, [prompt])[0]


def test_prefix_blocks_are_keyed_by_a_cryptographic_chain():
    import hashlib
    from array import array

    from nanoseek.engine.cache import chain_hash

    first = chain_hash(None, (1, 2, 3))
    assert first == hashlib.blake2b(bytes(32) + array("q", [1, 2, 3]).tobytes(), digest_size=32).digest()
    # The same block after different parents is a different key: a hit implies the whole prefix matched.
    assert chain_hash(first, (4, 5)) != chain_hash(chain_hash(None, (1, 2, 4)), (4, 5))


def test_a_fault_in_a_batch_is_pinned_on_the_request_that_causes_it(hf_checkpoint, monkeypatch):
    directory, hf = hf_checkpoint("llama")
    prompts = _prompts(lengths=(5, 13, 22))
    expected = _reference(hf, prompts)
    for fault in ("always with b", "once"):
        llm = LLM(directory)
        engine = llm.engine
        real_run, fired = engine.runner.run, []

        def faulty(plan):
            bad = any(item.seq.request.request_id == "b" for item in plan)
            if (fault == "always with b" and bad) or (fault == "once" and not fired):
                fired.append(len(plan))
                raise RuntimeError("injected fault")
            return real_run(plan)

        monkeypatch.setattr(engine.runner, "run", faulty)
        for request_id, prompt in zip("abc", prompts):
            engine.add(engine.make_request(prompt, GREEDY, request_id))
        outputs = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
        assert fired[0] == 3  # the fault first hit a batch of all three
        if fault == "always with b":  # the culprit alone fails; the others answer as if nothing happened
            assert outputs["b"].error and outputs["b"].outputs[0].finish_reason == "error"
            assert [outputs[r].outputs[0].token_ids for r in "ac"] == [expected[0], expected[2]]
        else:  # a one-off fault costs a recomputation, not an answer
            assert not any(o.error for o in outputs.values())
            assert [outputs[r].outputs[0].token_ids for r in "abc"] == expected
        assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.suspects
