"""GRPO rollouts on running `nanoseek serve` processes (any number, on any machines), as TRL uses a vLLM server.

The trainer pushes each step's weights to every server (`POST /admin/weights`, a safetensors body, the server's
`--admin-key`) and waits for all of them; rollouts then go to the servers round-robin as token-id prompts on
/v1/completions (the same ids the in-process engine would see) with per-prompt seeds, asking for the chosen
tokens' ids and processed log-probs. Each answer names the weights version it was admitted under
(`X-Nanoseek-Weights-Version`); one older than `max_staleness` steps is refused, so no rollout is ever scored
against weights older than the step allows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..errors import NanoseekError
from ..serve.admin import VERSION_HEADER
from .rollouts import Rollout


class RolloutError(NanoseekError):
    """A rollout server failed, refused, or answered from weights that are too old."""


class RolloutServers:
    def __init__(self, urls: list[str], admin_key: str, max_staleness: int = 0, timeout: float = 600.0,
                 api_key: str = ""):
        if not admin_key:
            raise RolloutError("grpo.rollout_servers needs the servers' admin key: grpo.admin_key or "
                               "NANOSEEK_ADMIN_KEY (start each server with --admin-key)")
        self.urls = [u.rstrip("/") for u in urls]
        self.headers = {"Authorization": f"Bearer {admin_key}"}
        self.api_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # servers with API keys
        self.max_staleness, self.timeout = max_staleness, timeout

    def push(self, state: dict, version: int) -> None:
        """The weights into every server; returns when all of them answer with them."""
        import httpx
        from safetensors.torch import save

        # Cloned: tied tensors share storage, which safetensors refuses to write.
        body = save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()})

        def one(url):
            try:
                r = httpx.post(f"{url}/admin/weights", params={"version": version}, content=body,
                               headers={**self.headers, "Content-Type": "application/octet-stream"},
                               timeout=self.timeout)
            except httpx.HTTPError as e:
                raise RolloutError(f"rollout server {url} unreachable while pushing weights: {e}") from None
            if r.status_code != 200:
                raise RolloutError(f"rollout server {url} refused weights version {version}: HTTP {r.status_code} "
                                   f"{r.text[:300]}")

        with ThreadPoolExecutor(len(self.urls)) as pool:
            list(pool.map(one, self.urls))

    def generate(self, prompts: list[list[int]], bodies: list[dict], step: int) -> list[list[Rollout]]:
        """Completions of each token-id prompt (its request body given), in order."""
        import httpx

        oldest = step - self.max_staleness

        def one(i):
            url = self.urls[i % len(self.urls)]
            body = {**bodies[i], "prompt": prompts[i], "logprobs": 0, "logprobs_mode": "processed",
                    "return_token_ids": True, "stream": False}
            try:
                r = httpx.post(f"{url}/v1/completions", json=body, headers=self.api_headers, timeout=self.timeout)
            except httpx.HTTPError as e:
                raise RolloutError(f"rollout server {url} unreachable: {e}") from None
            if r.status_code != 200:
                raise RolloutError(f"rollout server {url} answered HTTP {r.status_code}: {r.text[:300]}")
            version = int(r.headers.get(VERSION_HEADER, -1))
            if version < oldest:
                raise RolloutError(f"rollout server {url} answered with weights version {version}, older than "
                                   f"step {step} allows (max_staleness {self.max_staleness})")
            out = r.json()
            return [Rollout(c["token_ids"], c["text"], c["logprobs"]["token_logprobs"], c["finish_reason"] == "length")
                    for c in sorted(out["choices"], key=lambda c: c["index"])]

        with ThreadPoolExecutor(max(1, min(len(prompts), 64))) as pool:
            return list(pool.map(one, range(len(prompts))))
