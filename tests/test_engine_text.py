"""Text handling: incremental detokenization, stop-string hold-back, the <think> reasoning split."""

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoseek import LLM, SamplingParams
from nanoseek.engine import AsyncLLM
from nanoseek.engine.text import IncrementalDetokenizer, partial_suffix_len, split_reasoning, starts_in_reasoning
from nanoseek.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d, vocab_size=300)
    return load_tokenizer(d)


def test_incremental_detokenizer_never_emits_broken_characters(tokenizer):
    text = "Ünïcödé 🙂 数字 and plain words"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, set())
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_partial_suffix_len():
    assert partial_suffix_len("hello wor", ["world"]) == 3
    assert partial_suffix_len("hello", ["xyz"]) == 0
    assert partial_suffix_len("abcST", ["STOP", "T!"]) == 2


@given(st.text("ab", max_size=12), st.lists(st.text("abc", min_size=1, max_size=8), max_size=4))
def test_partial_suffix_len_is_the_longest_suffix_that_starts_a_stop(text, stops):
    expected = max([k for p in stops for k in range(1, min(len(p) - 1, len(text)) + 1) if text.endswith(p[:k])],
                   default=0)
    assert partial_suffix_len(text, stops) == expected


@given(st.text(alphabet="ab<>/thinkx ", max_size=40))
def test_reasoning_split_streaming_prefixes_never_take_text_back(text):
    final_r, final_c = split_reasoning(text, True, final=True)
    for cut in range(len(text) + 1):
        r, c = split_reasoning(text[:cut], True, final=False)
        assert final_r.startswith(r) and final_c.startswith(c)


def test_reasoning_split_cases():
    assert split_reasoning("plan it</think>The answer is 4.", True, True) == ("plan it", "The answer is 4.")
    assert split_reasoning("<think>plan</think>4", False, True) == ("plan", "4")
    assert split_reasoning("just an answer", False, True) == ("", "just an answer")
    assert split_reasoning("still thinking </th", True, False) == ("still thinking ", "")
    assert starts_in_reasoning("<｜Assistant｜><think>\n") and not starts_in_reasoning("<think>a</think>b")


def test_chat_outputs_split_reasoning_when_the_template_opens_think(chat_checkpoint):
    """R1's template ends the prompt with <think>: the output has no opening tag and starts as reasoning."""
    directory, _ = chat_checkpoint("deepseek_v3")
    llm = LLM(directory)
    think_close = llm.tokenizer.token_to_id("</think>")

    def close_think_at_3(ids, logits):  # force "</think>" as the 3rd token, then normal decoding
        if len(ids) == 2:
            logits[:] = float("-inf")
            logits[think_close] = 0.0
        elif think_close is not None:
            logits[think_close] = float("-inf")
        return logits

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logits_processors=[close_think_at_3])
    out = llm.chat([{"role": "user", "content": "What is 2+2?"}], params)[0].outputs[0]
    assert "</think>" in out.text
    before, after = out.text.split("</think>", 1)
    assert out.reasoning_content == before and out.content == after


def test_async_streaming_and_cancellation_free_blocks(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    llm = AsyncLLM(directory, block_size=4)
    engine = llm.engine
    free = engine.blocks.num_free

    async def run():
        chunks = []
        async for out in llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=12,
                                                                            ignore_eos=True)):
            chunks.append(out.outputs[0].text)
        assert out.finished and len(out.outputs[0].token_ids) == 12
        assert all(chunks[-1].startswith(c) for c in chunks) and len(chunks) > 1

        async def consume_forever():
            async for _ in llm.generate("def add(a, b):", SamplingParams(max_tokens=10_000, ignore_eos=True)):
                pass

        tasks = [asyncio.create_task(consume_forever()) for _ in range(3)]
        await asyncio.sleep(0.3)
        assert engine.blocks.num_free < free
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    from serving import wait_until

    assert wait_until(lambda: engine.blocks.num_free == free and not engine.requests)  # aborted between steps
    llm.shutdown()


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=12))
def test_bulk_detokenization_gives_the_text_token_by_token_detokenization_gives(tokenizer, splits):
    """The engine detokenizes lazily, several tokens at once (IncrementalDetokenizer.extend): the same text as
    one token at a time, unfinished UTF-8 characters included."""
    ids = tokenizer.encode("Ünïcödé 🙂 数字 and plain words, again: 🙂🙂 ok", add_special_tokens=False)
    one_by_one = IncrementalDetokenizer(tokenizer, set())
    expected = "".join(one_by_one.add(i) for i in ids) + one_by_one.flush()
    bulk, out, start = IncrementalDetokenizer(tokenizer, set()), [], 0
    for size in splits + [len(ids)]:
        chunk = ids[start:start + max(size, 1)]
        if chunk:
            out.append(bulk.extend(chunk))
        start += len(chunk)
    out.append(bulk.flush())
    assert "".join(out) == expected == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in out)
