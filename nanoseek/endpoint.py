"""A model behind an OpenAI-compatible URL (a nanoseek server, vLLM, the DeepSeek API) as a teacher or an
evaluation subject: chat prompts in, completions out in the engine's own form (the text after the opened
<think>: reasoning, </think>, answer), so the same verifiers score both."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from .engine.text import THINK_CLOSE


def is_endpoint(source) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


class Endpoint:
    def __init__(self, url: str, api_key: str | None = None, concurrency: int = 8):
        import openai

        base = url.rstrip("/")
        self.url = url
        # The key comes from the environment (never a recipe file); local servers need none.
        self.client = openai.OpenAI(base_url=base if base.endswith("/v1") else base + "/v1",
                                    api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none", max_retries=2)
        self.model = self.client.models.list().data[0].id
        self.concurrency = concurrency

    def chat(self, prompts: list[list[dict]], n: int = 1, temperature: float = 0.0, max_tokens: int = 256,
             top_p: float = 1.0, seed: int | None = None) -> list[list[tuple[str, bool]]]:
        """For each prompt, n (completion, finished) pairs; finished means the model stopped by itself."""
        def one(messages):
            r = self.client.chat.completions.create(model=self.model, messages=messages, n=n, top_p=top_p,
                                                    temperature=temperature, max_tokens=max_tokens, seed=seed)
            out = []
            for c in r.choices:
                reasoning = (c.message.model_extra or {}).get("reasoning_content")
                content = c.message.content or ""
                # No answer after the reasoning: the thought was never closed (or closed on nothing to say).
                text = f"{reasoning}{THINK_CLOSE}{content}" if reasoning is not None and content else \
                    (reasoning or content)
                out.append((text, c.finish_reason == "stop"))
            return out

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, prompts))
