"""`nanoseek chat`: a terminal chat that streams tokens, dims the reasoning, reports tokens/s.

/reset forgets the conversation, /exit (or Ctrl-D) leaves. Ctrl-C while the model writes stops that answer
(its request is aborted and its cache blocks freed); Ctrl-C at the prompt leaves. No tracebacks either way.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

DIM, RESET = "\033[2m", "\033[0m"


def run_chat(llm, params, system: str | None = None, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdout.isatty()
    dim, reset = (DIM, RESET) if tty else ("", "")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if threading.current_thread() is threading.main_thread():
        # A process started in the background inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: the chat is interactive, so Ctrl-C must always reach it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    stdout.write("nanoseek chat: /reset to start over, /exit to leave.\n")
    while True:
        try:
            stdout.write("\n> ")
            stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if not line:
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            stdout.write("(conversation reset)\n")
            continue
        history.append({"role": "user", "content": text})
        shown_reasoning = shown_content = 0
        out = None
        start = time.monotonic()
        stream = llm.stream(history, params)
        try:
            for out in stream:
                o = out.outputs[0]
                reasoning = o.reasoning_content if o.reasoning_content is not None else ""
                content = o.content if o.content is not None else o.text
                if len(reasoning) > shown_reasoning:
                    if shown_reasoning == 0:
                        stdout.write(f"{dim}[thinking] ")
                    stdout.write(f"{dim}{reasoning[shown_reasoning:]}{reset}")
                    shown_reasoning = len(reasoning)
                if len(content) > shown_content:
                    if shown_content == 0 and shown_reasoning:
                        stdout.write("\n")
                    stdout.write(content[shown_content:])
                    shown_content = len(content)
                stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # aborts the request
            stdout.write(f"{reset}\n(interrupted)\n")
            history.pop()
            continue
        if out is None:
            continue
        o = out.outputs[0]
        elapsed = max(time.monotonic() - start, 1e-9)
        n = len(o.token_ids)
        stdout.write(f"\n{dim}[{n} tokens, {n / elapsed:.1f} tokens/s, finish: {o.finish_reason}]{reset}\n")
        history.append({"role": "assistant", "content": o.content if o.content is not None else o.text})
