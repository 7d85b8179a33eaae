"""Synthetic tasks, verifiers, sources, tokenizer training and token shards."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data import shards
from nanoseek.data.sources import completion_text, load_task_file, read_records, sft_example, task_problems
from nanoseek.data.tasks import FAMILIES, addition_steps, generate, is_held_out, subtraction_steps
from nanoseek.data.verify import verify
from nanoseek.errors import ConfigError
from nanoseek.tokenizer import CHAT_TEMPLATE, train_tokenizer


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_generation_is_deterministic_and_held_out_never_overlaps_training(task):
    train = generate(task, [1, 2, 3], 3000, seed=0, split="train", distinct=False)
    test = generate(task, [1, 2, 3], 300, seed=0, split="test")
    assert train[:50] == generate(task, [1, 2, 3], 50, seed=0, split="train", distinct=False)
    assert train[:50] != generate(task, [1, 2, 3], 50, seed=1, split="train", distinct=False)
    train_keys, test_keys = {p.key for p in train}, {p.key for p in test}
    assert not train_keys & test_keys
    assert len(test_keys) == 300  # the held-out set has no duplicates
    assert all(is_held_out(k) for k in test_keys) and not any(is_held_out(k) for k in train_keys)
    # Other seeds draw from the same split: still no overlap.
    other = generate(task, [1, 2, 3], 3000, seed=7, split="train", distinct=False)
    assert not {p.key for p in other} & test_keys


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_reference_answers_verify_and_wrong_ones_do_not(task):
    for p in generate(task, [1, 2, 3], 50, seed=3):
        good = "<think>\n" + p.solution + "\n</think>\n\n" + f"The answer is {p.answer}."
        assert verify(good, p.answer, p.verifier, p.question), p
        assert not verify("<think>hmm</think>The answer is 123456789.", p.answer, p.verifier, p.question)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10 ** 9), st.integers(0, 10 ** 9))
def test_worked_column_solutions_compute_the_right_result(a, b):
    lines = addition_steps(a, b)
    assert int(lines[-1].rsplit("so far ", 1)[1]) == a + b
    # each line's running result is the previous one with one more digit in front
    partial = [line.rsplit("so far ", 1)[1] for line in lines]
    assert all(p.endswith(q) and len(p) == len(q) + 1 for q, p in zip(partial, partial[1:]))
    hi, lo = max(a, b), min(a, b)
    assert int(subtraction_steps(hi, lo)[-1].rsplit("so far ", 1)[1]) == hi - lo


def test_unparseable_reference_never_earns_credit():
    for verifier in ("numeric", "math", "exact"):
        assert not verify("The answer is 42.", "", verifier)
        assert not verify("The answer is 42.", "no number here" if verifier != "exact" else "", verifier)
    assert verify("blah </think> so it is 1,234", "1234", "numeric")
    assert verify("</think> x = \\frac{1}{2}", "0.5", "math")
    assert not verify("</think> 7", "no-number", "math")


def test_task_file_loading_and_errors(tmp_path):
    f = tmp_path / "tasks.jsonl"
    rows = [{"question": f"What is {i} times 3?", "answer": str(3 * i), "verifier": "numeric"} for i in range(200)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems = load_task_file(f)
    assert len(problems) == 200 and problems[0].answer == "0"
    train, test = task_problems(str(f), [], 0, 0, "train"), task_problems(str(f), [], 0, 0, "test")
    assert len(train) + len(test) == 200 and not {p.question for p in train} & {p.question for p in test}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ConfigError, match="answer"):
        load_task_file(bad)
    bad.write_text('{"question": "q", "answer": "1", "verifier": "vibes"}\n')
    with pytest.raises(ConfigError, match="verifier"):
        load_task_file(bad)
    bad.write_text("not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_task_file(bad)


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained_tok")
    problems = generate("arithmetic", [1, 2, 3], 500, 0, distinct=False)
    texts = [p.question + "\n" + p.solution for p in problems]
    return train_tokenizer(texts, 320, d), d


def test_trained_tokenizer_loads_in_transformers_with_identical_chat_ids(trained_tokenizer):
    from transformers import AutoTokenizer

    tok, d = trained_tokenizer
    hf = AutoTokenizer.from_pretrained(d)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
                    {"role": "assistant", "content": "<think>\n2+0=2\n</think>\n\n42"},
                    {"role": "user", "content": "And 7 - 5?"}]
    for gen in (True, False):
        ours = tok.apply_chat_template(conversation, add_generation_prompt=gen)
        theirs = hf.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert ours == list(theirs)
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    ids = tok.encode("12345", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == list("12345")  # one token per digit
    text = "<think>\nplan\n</think>\n\nok"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text  # think tags survive decoding
    assert tok.encode("x")[0] == tok.bos_token_id


def test_shards_pack_windows_across_shard_boundaries_and_resume(trained_tokenizer, tmp_path):
    tok, _ = trained_tokenizer
    docs = [p.question + "\n" + p.solution for p in generate("arithmetic", [2, 3], 300, 1, distinct=False)]
    meta = shards.write_documents(tmp_path / "s", tok, docs, shard_tokens=500)  # many small shards
    assert len(meta["shards"]) > 5 and meta["total_bytes"] == sum(len(d.encode()) for d in docs)
    stream = np.concatenate([np.fromfile(tmp_path / "s" / s["tokens"], dtype=np.uint16) for s in meta["shards"]])
    loader = shards.PackedLoader(tmp_path / "s", seq_len=64, seed=3)
    for i in (0, 7, loader.num_windows - 1):  # every window is the stream slice, even across files
        assert np.array_equal(loader.window(i)[0], stream[i * 64:i * 64 + 65])
    first = loader.next_indices(10)
    state = loader.state_dict()
    after = loader.next_indices(25)
    again = shards.PackedLoader(tmp_path / "s", seq_len=64, seed=3)
    again.load_state_dict(state)
    assert again.next_indices(25) == after
    # An epoch visits every window exactly once.
    fresh = shards.PackedLoader(tmp_path / "s", seq_len=64, seed=3)
    assert sorted(fresh.next_indices(fresh.num_windows)) == list(range(fresh.num_windows))
    assert first == fresh._order_for(0)[:10].tolist()


def test_chat_shards_mask_only_the_assistant_completion(trained_tokenizer, tmp_path):
    tok, _ = trained_tokenizer
    problems = generate("arithmetic", [2], 20, 2)
    shards.write_chats(tmp_path / "c", tok, [sft_example(p) for p in problems])
    tokens = np.fromfile(tmp_path / "c" / "tokens_00000.bin", dtype=np.uint16)
    mask = np.fromfile(tmp_path / "c" / "mask_00000.bin", dtype=np.uint8)
    first_prompt = tok.apply_chat_template([{"role": "user", "content": problems[0].question}])
    completion = tok.encode(completion_text(problems[0]), add_special_tokens=False) + [tok.eos_token_id]
    n = len(first_prompt) + len(completion)
    assert tokens[:n].tolist() == first_prompt + completion
    assert mask[:n].tolist() == [0] * len(first_prompt) + [1] * len(completion)
    assert tok.decode(tokens[len(first_prompt):n].tolist()).startswith(problems[0].solution.split("\n")[0])
    # Bits per byte divide the loss (averaged over completion tokens) by completion bytes per completion token.
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    completions = [completion_text(p) for p in problems]
    trained = sum(len(tok.encode(c, add_special_tokens=False)) + 1 for c in completions)
    assert meta["bytes_per_token"] == pytest.approx(sum(len(c.encode()) for c in completions) / trained)
    assert int(mask.sum()) == trained


def test_loader_batch_targets_are_shifted_inputs(trained_tokenizer, tmp_path):
    tok, _ = trained_tokenizer
    problems = generate("arithmetic", [2], 50, 2)
    shards.write_chats(tmp_path / "c", tok, [sft_example(p) for p in problems])
    loader = shards.PackedLoader(tmp_path / "c", seq_len=32, seed=0)
    x, y, mask = loader.batch([0, 1])
    assert x.shape == y.shape == mask.shape == (2, 32) and x.dtype == torch.int64
    assert torch.equal(x[0, 1:], y[0, :-1])
    raw_mask = np.fromfile(tmp_path / "c" / "mask_00000.bin", dtype=np.uint8)
    assert mask[0].tolist() == raw_mask[1:33].astype(bool).tolist()


def test_carries_levels_count_the_carries_and_keep_three_digits():
    for level in range(1, 5):
        for p in generate("carries", [level], 30, 0):
            a, b = p.key.split(":")[1].replace("-", "+").split("+")
            assert len(a) == len(b) == 3 and p.level == level
            assert p.solution.count(", carry") + p.solution.count(" borrow,") == level - 1


def test_products_levels_count_the_carries_of_the_last_sum_and_every_line_is_right():
    from nanoseek.data.tasks import addition_carries

    assert [addition_carries(*xy) for xy in ((7350, 1176), (1200, 34), (95, 5), (999, 1))] == [1, 0, 2, 3]
    for level in range(1, 4):
        for p in generate("products", [level], 40, 3):
            a, b = map(int, p.key.split(":")[1].split("*"))
            assert 10 <= a <= 499 and 10 <= b <= 99 and p.answer == str(a * b)
            lines = p.solution.split("\n")
            tens, units = divmod(b, 10)
            assert lines[:3] == [f"{a}*{b} = {a}*{tens}0 + {a}*{units}",
                                 f"{a}*{tens}={a * tens}, so {a}*{tens}0={a * tens * 10}", f"{a}*{units}={a * units}"]
            assert lines[3:-1] == [f"{a * tens * 10}+{a * units}={a * b}"]
            assert min(1 + addition_carries(a * tens * 10, a * units), 3) == level
            assert p.solution.endswith(f"so {a}*{b}={a * b}")
    with pytest.raises(ValueError, match="levels 1-3"):
        generate("products", [4], 1, 0)


def test_sources_stream_text_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanoseek.data import sources

    d = tmp_path / "corpus"
    (d / "c").mkdir(parents=True)
    para = " ".join(["word"] * 20_000)  # 100K characters: a large file is cut at blank lines
    (d / "a.txt").write_text("\n\n".join([para] * 3) + "\n")
    docs = [r["text"] for r in sources.read_records(d / "a.txt")]
    assert [x.strip() for x in docs] == [para] * 3
    (tmp_path / "line.txt").write_text("x" * 2_500_000)  # one line longer than a document may be
    pieces = [r["text"] for r in sources.read_records(tmp_path / "line.txt")]
    assert "".join(pieces) == "x" * 2_500_000 and max(map(len, pieces)) <= sources.MAX_DOC_CHARS
    (tmp_path / "small.txt").write_text("one\n\ntwo\n")
    assert [r["text"] for r in sources.read_records(tmp_path / "small.txt")] == ["one\n\ntwo\n"]  # small: whole
    (d / "b.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n')
    table = pa.table({"text": [f"p{i}" for i in range(300)], "id": list(range(300))})
    pq.write_table(table, d / "c" / "x.parquet", row_group_size=100)
    assert pq.ParquetFile(d / "c" / "x.parquet").num_row_groups == 3
    records = list(sources.read_records(d))  # a directory is one source, files in name order
    assert [r["text"].strip() for r in records] == [para] * 3 + ["j1", "j2"] + [f"p{i}" for i in range(300)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        list(sources.read_records(tmp_path / "empty"))


def test_tokenizing_a_corpus_keeps_memory_independent_of_its_size(tmp_path):
    """bench/data.py's small version: peak RSS of tokenizing 4 MB and 20 MB of text (each in a fresh process,
    getrusage) differ by far less than the corpora do; the shards hold every document."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parent.parent / "bench" / "data.py"
    results = {}
    for mb in (4, 20):
        out = subprocess.run([sys.executable, str(bench), "--text-gb", str(mb / 1000), "--parquet-gb", "0.004",
                              "--keep", str(tmp_path / f"c{mb}")], capture_output=True, text=True, timeout=280)
        assert out.returncode == 0, out.stderr[-2000:]
        results[mb] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = results[4]["text"], results[20]["text"]
    assert large["text_mb"] > 4 * small["text_mb"] * 0.9 and large["docs"] > small["docs"]
    print(results)
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 40, results  # 16 MB more text, not 16 MB more memory
    meta = json.loads((tmp_path / "c20" / "shards_text" / "meta.json").read_text())
    docs = list(read_records(tmp_path / "c20" / "corpus.txt"))
    assert meta["docs"] == len(docs) and meta["total_bytes"] == sum(len(r["text"].encode()) for r in docs)
    assert results[20]["parquet_dir"]["docs"] > 0
