"""GRPO rollouts on running servers: the admin route that takes a trainer's weights (absent without --admin-key,
401 without the key), the weights version on every answer, staleness refused, and GRPO through two servers
training the tiny model as in-process rollouts do."""

import shutil

import httpx
import pytest
import torch
from safetensors.torch import save

from nanoseek.checkpoint import load_model
from nanoseek.serve.service import ServeConfig
from nanoseek.train.rollout_servers import RolloutError, RolloutServers
from serving import live_server

ADMIN = {"Authorization": "Bearer adm"}
PROMPT = {"prompt": [0, 5, 6, 7], "max_tokens": 6, "temperature": 0}


def _state(llm):
    return {k: v.detach().clone().contiguous() for k, v in llm.engine.model.state_dict().items()}


def test_the_admin_route_takes_weights_only_with_its_key(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    with live_server(directory) as (base, _, _):  # no --admin-key: no admin routes at all
        assert httpx.post(base + "/admin/weights", content=b"x").status_code == 404
        assert httpx.get(base + "/admin/version").status_code == 404
    config = ServeConfig(admin_key="adm", api_key="user-key", max_body_bytes=100_000)
    with live_server(directory, config) as (base, llm, _):
        user = {"Authorization": "Bearer user-key"}
        assert httpx.get(base + "/admin/version").status_code == 401
        assert httpx.get(base + "/admin/version", headers=user).status_code == 401  # an API key is not the admin key
        assert httpx.get(base + "/admin/version", headers=ADMIN).json() == {"version": 0}
        before = httpx.post(base + "/v1/completions", json=PROMPT, headers=user)
        assert before.headers["x-nanoseek-weights-version"] == "0"
        state = _state(llm)
        changed = {k: (v * 0.5 if k.endswith("lm_head.weight") or "embed" in k else v) for k, v in state.items()}
        body = save(changed)  # larger than the server's request limit: admin pushes are exempt
        assert len(body) > 100_000
        assert httpx.post(base + "/admin/weights?version=3", content=body).status_code == 401
        r = httpx.post(base + "/admin/weights?version=3", content=body, headers=ADMIN, timeout=60)
        assert r.status_code == 200 and r.json()["version"] == 3
        after = httpx.post(base + "/v1/completions", json={**PROMPT, "logprobs": 0}, headers=user)
        assert after.headers["x-nanoseek-weights-version"] == "3"
        served = llm.engine.model.state_dict()
        key = next(k for k in served if "embed" in k)
        assert torch.equal(served[key], changed[key])  # the engine holds the pushed weights
        bad = [(b"not safetensors", "not a safetensors file"),
               (save({"nope": torch.zeros(2)}), "weights rejected")]
        for content, words in bad:
            r = httpx.post(base + "/admin/weights?version=4", content=content, headers=ADMIN)
            assert r.status_code == 400 and words in r.json()["error"]["message"]
        r = httpx.post(base + "/admin/weights", content=save(state), headers=ADMIN)
        assert r.status_code == 400 and "version" in r.json()["error"]["message"]
        assert httpx.get(base + "/admin/version", headers=ADMIN).json() == {"version": 3}  # refused pushes change nothing
        servers = RolloutServers([base], "adm", max_staleness=0, api_key="user-key")
        with pytest.raises(RolloutError, match="weights version 3, older than step 5"):
            servers.generate([[0, 5, 6]], [{"n": 1, "max_tokens": 2, "temperature": 0, "seed": 1}], step=5)
        assert servers.generate([[0, 5, 6]], [{"n": 2, "max_tokens": 2, "temperature": 1.0, "seed": 1}], step=3)
    with pytest.raises(RolloutError, match="admin key"):
        RolloutServers(["http://127.0.0.1:1"], "")


def test_grpo_through_two_rollout_servers_trains_as_in_process_rollouts(tmp_path, monkeypatch):
    from nanoseek.train.grpo import run_grpo
    from nanoseek.train.metrics import read_metrics
    from nanoseek.train.recipe import load_recipe
    from nanoseek.train.stages import run_stage
    from recipes import GRPO_SIGNAL, SIGNAL_REWARDS, write_tiny_recipe

    (tmp_path / "signal_rewards.py").write_text(SIGNAL_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["pretrain.steps=3", "sft.steps=2", "grpo.steps=2", "train.dtype=float32", "eval.during_training=false"]
    recipe = load_recipe(write_tiny_recipe(tmp_path, extra=GRPO_SIGNAL), overrides)
    run_stage(recipe, "pretrain", show_progress=False)
    sft = run_stage(recipe, "sft", show_progress=False)
    runs = tmp_path / "runs" / "tiny"
    run_grpo(recipe, show_progress=False)
    shutil.move(runs / "grpo", runs / "grpo_local")
    config = lambda: ServeConfig(admin_key="adm")  # noqa: E731
    with live_server(sft, config(), dtype="float32") as (a, _, _), live_server(sft, config(), dtype="float32") as (b, _, _):
        remote = {**recipe, "grpo": {**recipe["grpo"], "rollout_servers": [a, b], "admin_key": "adm"}}
        run_grpo(remote, show_progress=False)
        versions = [httpx.get(u + "/admin/version", headers=ADMIN).json()["version"] for u in (a, b)]
    assert versions == [2, 2]  # each step's weights reached both servers
    local = [m for m in read_metrics(runs / "grpo_local" / "metrics.jsonl") if "reward_mean" in m]
    served = [m for m in read_metrics(runs / "grpo" / "metrics.jsonl") if "reward_mean" in m]
    assert len(local) == len(served) == 2
    for x, y in zip(local, served):  # the same samples (seeded per prompt), so the same rewards and updates
        assert x["reward_mean"] == y["reward_mean"] and x["completion_length_mean"] == y["completion_length_mean"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["engine_logprob_gap"] == pytest.approx(y["engine_logprob_gap"], abs=1e-4)
    assert any(x["grad_norm"] > 0 for x in local)
    wa, wb = load_model(runs / "grpo_local" / "model").state_dict(), load_model(runs / "grpo" / "model").state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
