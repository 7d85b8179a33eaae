"""`nanoseek generate` and `nanoseek chat` end to end, as subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

from nanoseek import LLM, SamplingParams

import procs

CLI = [sys.executable, "-m", "nanoseek.cli"]


def test_generate_json_matches_the_library(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    r = procs.run(CLI + ["generate", "--model", str(directory), "--prompt", "The quick brown",
                              "--max-tokens", "8", "--temperature", "0", "--json"],
                       capture_output=True, text=True, check=True)
    result = json.loads(r.stdout)
    expected = LLM(directory).generate("The quick brown", SamplingParams(temperature=0, max_tokens=8))[0]
    assert result["token_ids"] == expected.outputs[0].token_ids
    assert result["text"] == expected.outputs[0].text


def test_generate_plain_text_and_bad_model(chat_checkpoint, tmp_path):
    directory, _ = chat_checkpoint("deepseek_v3")
    r = procs.run(CLI + ["generate", "--model", str(directory), "--prompt", "Hi", "--max-tokens", "4",
                              "--temperature", "0"], capture_output=True, text=True, check=True)
    expected = LLM(directory).generate("Hi", SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].text
    assert r.stdout == expected + "\n"
    r = procs.run(CLI + ["generate", "--model", str(tmp_path), "--prompt", "Hi"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_eval_honours_the_engine_options(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    base = CLI + ["eval", "--model", str(directory), "--problems", "2", "--max-tokens", "4"]
    r = procs.run(base + ["--device", "nosuch"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown device 'nosuch'" in r.stderr, r.stderr[-500:]
    r = procs.run(base + ["--max-model-len", "4"], capture_output=True, text=True)
    assert r.returncode == 2 and "context is 4" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]
    r = procs.run(base + ["--max-model-len", "256", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["greedy"]["problems"] == 2, r.stderr[-500:]


def test_chat_reset_and_exit(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    r = procs.run(CLI + ["chat", "--model", str(directory), "--max-tokens", "6", "--temperature", "0"],
                       input="What is 2+2?\n/reset\nHello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("tokens/s") == 2 and "(conversation reset)" in r.stdout
    assert "Traceback" not in r.stderr


def test_chat_ctrl_c_interrupts_the_answer_without_a_traceback(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    with procs.spawn(CLI + ["chat", "--model", str(directory), "--max-tokens", "100000", "--temperature", "1",
                            "--ignore-eos"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        # Bytes, not text: the reads below may stop inside a multi-byte character of a random model's output.
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 60
        while b"> " not in seen and time.monotonic() < deadline:  # the input prompt
            seen += os.read(proc.stdout.fileno(), 1)
        answer_starts = len(seen)
        # Mid-answer: some of the streamed reply (reasoning or not: a random model may close </think> at once) is
        # out.
        while len(seen) < answer_starts + 40 and time.monotonic() < deadline:
            seen += os.read(proc.stdout.fileno(), 1)
        assert len(seen) >= answer_starts + 40, seen
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        out, err = proc.communicate(b"/exit\n", timeout=60)
    out, err = (seen + out).decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "(interrupted)" in out and "Traceback" not in err
