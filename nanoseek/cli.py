"""The `nanoseek` command line. Each subcommand parses its flags here and calls into the library.

Errors a user can fix (NanoseekError) print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, NanoseekError


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def cmd_inspect(args) -> int:
    from pathlib import Path

    from .checkpoint import find_checkpoint_files, mtp_depths_in_checkpoint
    from .config_v4 import DeepseekV4Config
    from .model.accounting import model_cost
    from .presets import resolve_config

    config = resolve_config(args.model)
    if isinstance(config, DeepseekV4Config):
        return _inspect_v4(config, args)
    mtp_note = None
    path = Path(args.model)
    if path.is_dir() and config.num_nextn_predict_layers:
        files = find_checkpoint_files(path)
        if mtp_depths_in_checkpoint(files.key_to_file, config) == 0:
            mtp_note = (f"config asks for {config.num_nextn_predict_layers} MTP layer(s) but the checkpoint holds "
                        "no MTP tensors: MTP is off when loaded")
            config = config.replace(num_nextn_predict_layers=0)
    cost = model_cost(config, context=args.context)
    info = {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention": "MLA" if config.is_mla else "GQA",
        "routed_experts": config.n_routed_experts or 0,
        "experts_per_token": config.num_experts_per_tok or 0,
        "mtp_layers": config.num_nextn_predict_layers,
        **cost.as_dict(),
    }
    if mtp_note:
        info["mtp_note"] = mtp_note
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model_type        {info['model_type']} ({info['attention']}, {info['layers']} layers, "
          f"hidden {info['hidden_size']}" + (f", {info['routed_experts']} routed experts, "
                                             f"{info['experts_per_token']} active" if info["routed_experts"] else "")
          + ")")
    print(f"parameters        {_human(cost.total_params)} total ({cost.total_params:,})")
    print(f"active per token  {_human(cost.active_params)} ({cost.active_params:,}; input embedding excluded)")
    if config.num_nextn_predict_layers:
        print(f"MTP modules       {_human(cost.mtp_params)} ({config.num_nextn_predict_layers} layer(s), "
              "not included above)")
    if mtp_note:
        print(f"MTP               {mtp_note}")
    print(f"KV cache          {cost.kv_cache_bytes_per_token:,} bytes per token (bf16)")
    print(f"forward FLOPs     {_human(cost.flops_per_token)} per token at context {cost.flops_context:,}")
    return 0


def cmd_env(args) -> int:
    from . import runtime

    runtime.cpu()  # a malformed NANOSEEK_ISA is reported here, as one line
    report = runtime.report(measure=args.measure)
    if args.json:
        print(json.dumps(report))
        return 0
    c = report["cpu"]
    ceiling = f" (ceiling NANOSEEK_ISA={c['ceiling']}; native {c['native_isa']})" if c["ceiling"] else ""
    print(f"nanoseek on       python {report['python']}, torch {report['torch']}, {report['platform']}")
    print(f"CPU               {c['model']}, {c['arch']}, {c['cores']} cores")
    print(f"ISA level         {c['isa']}{ceiling}; torch kernels {c['torch_capability']}, "
          f"oneDNN bf16 {'yes' if c['onednn_bf16'] else 'no'}")
    print(f"native bf16       {'yes' if c['bf16_native'] else 'no: bf16 arithmetic is emulated here (~45x slower than float32)'}")
    print(f"accelerator       {report['accelerator'] or 'none'}")
    p = report["cpu_policy"]
    print(f"dtype auto        inference: bf16 checkpoint -> {p['inference_bf16_checkpoint']}, float32 checkpoint -> "
          f"{p['inference_float32_checkpoint']}; training -> {p['training']}")
    k = report["kernels"]
    print(f"kernels           decode: {k['decode']}; training: {k['training']}")
    if "measured" in report:
        m = report["measured"]
        print(f"measured          float32 GEMM {m['float32_gflops']} GFLOP/s, bf16 GEMM {m['bfloat16_gflops']} "
              f"GFLOP/s, 1 GiB sum-read {m['sum_read_gb_s']} GB/s")
    return 0


def _engine_args(p: argparse.ArgumentParser, model_help: str = "model directory (HF format)") -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps, xpu or auto")
    p.add_argument("--dtype", default="auto",
                   help="auto (the checkpoint's; on a CPU without native bf16, float32 arithmetic over bf16 "
                        "weights), float32 or bfloat16")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV cache budget, e.g. 512MiB")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--quantization", default=None, choices=["int8", "int4", "int4-g128"],
                   help="weight-only quantization at load: int8 per output channel, int4 in groups of 32 (or 128)")
    p.add_argument("--speculative", default=None, choices=["mtp"],
                   help="speculative decoding: the checkpoint's MTP module drafts, the model verifies")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="draft tokens per step (default 1)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _sampling_params(args):
    from .engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop,
                          ignore_eos=args.ignore_eos)


def _llm(args):
    from .engine import LLM

    return LLM(args.model, device=args.device, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
               max_model_len=args.max_model_len, quantization=args.quantization, speculative=args.speculative,
               num_speculative_tokens=args.num_speculative_tokens)


def _inspect_v4(config, args) -> int:
    """DeepSeek-V4: its cache grows with the context at a falling rate (the window, entries per 4 or 128
    tokens), so the KV bytes per token are a curve; and DeepSeek's claims at 1M context are set beside ours."""
    from .config_v4 import CSA, HCA, SLIDING
    from .model.accounting import KV_CURVE_CONTEXTS, model_cost, v4_cost
    from .presets import load_preset

    cost = v4_cost(config, context=args.context)
    curve = {n: v4_cost(config, n).kv_cache_bytes_per_token for n in KV_CURVE_CONTEXTS}
    million = 1 << 20
    v32 = model_cost(load_preset("deepseek-v3.2"), context=million)
    at_million = v4_cost(config, million)
    vs = {"flops": at_million.flops_per_token / v32.flops_per_token,
          "kv_cache": at_million.kv_cache_bytes_per_token / v32.kv_cache_bytes_per_token}
    kinds = {k: config.layer_types[: config.num_hidden_layers].count(k) for k in (SLIDING, CSA, HCA)}
    hashed = config.mlp_layer_types.count("hash_moe")
    info = {"model_type": config.model_type, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "attention": "V4 (window + CSA / HCA)", "layer_kinds": kinds, "hash_routed_layers": hashed,
            "routed_experts": config.n_routed_experts, "experts_per_token": config.num_experts_per_tok,
            "mtp_layers": config.num_nextn_predict_layers, **cost.as_dict(),
            "kv_cache_bytes_per_token_by_context": curve, "vs_deepseek_v32_at_1m_context": vs}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model_type        {config.model_type} ({config.num_hidden_layers} layers: {kinds[SLIDING]} window-only, "
          f"{kinds[CSA]} CSA (1 entry / {config.compress_rates[CSA]} tokens, top-{config.index_topk}), "
          f"{kinds[HCA]} HCA (1 / {config.compress_rates[HCA]}); hidden {config.hidden_size}, "
          f"{config.n_routed_experts} routed experts, {config.num_experts_per_tok} active, first {hashed} hash-routed)")
    print(f"parameters        {_human(cost.total_params)} total ({cost.total_params:,})")
    print(f"active per token  {_human(cost.active_params)} ({cost.active_params:,}; input embedding excluded)")
    print(f"MTP modules       {_human(cost.mtp_params)} ({config.num_nextn_predict_layers} layer(s), not included above)")
    print("KV cache          bytes per token (bf16), by context: "
          + ", ".join(f"{n:,}: {b:,}" for n, b in curve.items()))
    print(f"forward FLOPs     {_human(cost.flops_per_token)} per token at context {cost.flops_context:,}")
    print(f"vs DeepSeek-V3.2  at 1M context: {100 * vs['flops']:.0f}% of its FLOPs per token, "
          f"{100 * vs['kv_cache']:.0f}% of its KV cache (DeepSeek reports 27% and 10% for V4-Pro)")
    return 0


def cmd_generate(args) -> int:
    llm = _llm(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    out = llm.generate(prompt, _sampling_params(args))[0]
    completion = out.outputs[0]
    if args.json:
        result = {"text": completion.text, "token_ids": completion.token_ids,
                  "finish_reason": completion.finish_reason,
                  "prompt_tokens": len(out.prompt_token_ids),
                  "prompt_cache_hit_tokens": out.metrics.prompt_cache_hit_tokens}
        if completion.reasoning_content is not None:
            result["reasoning_content"] = completion.reasoning_content
            result["content"] = completion.content
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(completion.text)
    return 0


def cmd_chat(args) -> int:
    from .chat import run_chat

    return run_chat(_llm(args), _sampling_params(args), system=args.system)


def cmd_train(args) -> int:
    from .train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.stage == "tokenizer":
        from .train.corpus import prepare_tokenizer

        path = prepare_tokenizer(recipe)
        print(f"tokenizer: {path}")
        print((path / "stats.json").read_text() if (path / "stats.json").exists() else "")
        return 0
    if args.stage in ("pretrain", "sft"):
        from .train.stages import run_stage

        path = run_stage(recipe, args.stage, resume=args.resume, show_progress=not args.no_progress)
    elif args.stage == "grpo":
        from .train.grpo import run_grpo

        path = run_grpo(recipe, resume=args.resume, show_progress=not args.no_progress)
    else:
        raise NanoseekError(f"unknown stage {args.stage}")
    print(f"{args.stage} model: {path}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from .data.sources import task_problems
    from .endpoint import Endpoint, is_endpoint
    from .eval import evaluate, format_table

    levels = [int(x) for x in args.levels.split(",")] if args.levels else []
    if not levels and not Path(args.task).exists():
        levels = [1, 2, 3]
    split = args.split or ("all" if Path(args.task).exists() else "test")
    problems = task_problems(args.task, levels, args.problems, args.seed, split)
    llm = Endpoint(args.model) if is_endpoint(args.model) else _llm(args)
    results = {}
    if args.greedy or args.n == 1:
        results["greedy"] = evaluate(llm, problems, n=1, temperature=0.0, max_tokens=args.max_tokens)
    if args.n > 1:
        results["sampled"] = evaluate(llm, problems, n=args.n, temperature=args.temperature, top_p=args.top_p,
                                      max_tokens=args.max_tokens, seed=args.seed)
    for name, result in results.items():
        print(format_table(result, f"{name} ({'T=0' if name == 'greedy' else f'T={args.temperature}, n={args.n}'})"))
        print()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": str(args.model), "task": args.task, **results}, indent=2))
    if args.json:
        print(json.dumps({k: v["overall"] for k, v in results.items()}))
    return 0


def cmd_distill(args) -> int:
    from .train.distill import run_distill
    from .train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    summary = run_distill(recipe, teacher=args.teacher, student=args.student, task=args.task,
                          show_progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def cmd_serve(args) -> int:
    from .serve.server import ServerSettings, serve

    return serve(ServerSettings.from_args(args))


def cmd_usage(args) -> int:
    from .serve.app import parse_time
    from .serve.errors import APIError
    from .serve.ledger import COLUMNS, Ledger

    if not Path(args.db).is_file():
        raise ConfigError(f"no ledger at {args.db}: give the file passed to serve --ledger")
    try:
        start, end = parse_time(args.start, "start"), parse_time(args.end, "end")
    except APIError as e:
        raise ConfigError(e.message) from None
    ledger = Ledger(args.db)
    try:
        totals = ledger.totals(start, end)
    finally:
        ledger.close()
    if args.json:
        print(json.dumps({"start": start, "end": end, "keys": totals}))
        return 0
    header = ["key"] + list(COLUMNS)
    rows = [[name] + [f"{v[c]:.6f}" if c == "cost" else str(v[c]) for c in COLUMNS] for name, v in totals.items()]
    rows.append(["TOTAL"] + [f"{sum(v[c] for v in totals.values()):.6f}" if c == "cost" else
                             str(sum(v[c] for v in totals.values())) for c in COLUMNS])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
    return 0


def cmd_keys(args) -> int:
    import secrets

    from .serve.accounts import key_hash

    if args.action == "new":
        key = "sk-" + secrets.token_urlsafe(32)
        print(f"key        {key}\nkey_sha256 {key_hash(key)}")
        return 0
    if not args.key:
        raise ConfigError("nanoseek keys hash needs the KEY to hash")
    print(key_hash(args.key))
    return 0


def cmd_report(args) -> int:
    from .train.report import write_report

    path = write_report(args.run)
    print(f"report: {path}")
    return 0


def cmd_export(args) -> int:
    from .interop.gguf_export import export_gguf

    out = export_gguf(args.model, args.out, args.type, modelfile=not args.no_modelfile)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})"
          + ("" if args.no_modelfile else f" and {out.with_name('Modelfile')}"))
    return 0


def cmd_quantize(args) -> int:
    from .interop.quantize import quantize_checkpoint

    summary = quantize_checkpoint(args.src, args.dst, args.scheme, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek system as one small package.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameters, active parameters, KV-cache bytes and FLOPs of a model")
    p.add_argument("model", help="model directory, config.json, or a preset "
                                 "(deepseek-v3, deepseek-v3.2, deepseek-v4-flash, deepseek-v4-pro, deepseek-v2-lite, "
                                 "deepseek-r1-distill-qwen-1.5b)")
    p.add_argument("--context", type=int, default=4096, help="context length for the attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("env", help="this machine's CPU class (ISA, native bf16), kernels and dtype choices")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure", action="store_true", help="also measure GEMM rates and read bandwidth (~5 s)")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("generate", help="complete one prompt")
    _engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with token_ids and text")
    _sampling_args(p, max_tokens=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat (/reset, /exit)")
    _engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p, max_tokens=1024)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("train", help="train a tokenizer or a model stage from a TOML recipe")
    p.add_argument("stage", choices=["tokenizer", "pretrain", "sft", "grpo"])
    p.add_argument("--recipe", required=True, help="recipes/NAME.toml")
    p.add_argument("--resume", action="store_true", help="continue from the stage's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. pretrain.steps=50")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="pass@1 / pass@k / maj@k on held-out verifiable problems")
    _engine_args(p, "model directory (HF format), or the URL of an OpenAI-compatible server (OPENAI_API_KEY "
                    "from the environment)")
    p.add_argument("--task", default="arithmetic",
                   help="task family (arithmetic, carries, products, linear, countdown) or a JSONL file")
    p.add_argument("--levels", default="", help="comma-separated difficulty levels (default 1-3, the default task)")
    p.add_argument("--problems", type=int, default=500)
    p.add_argument("--split", choices=["test", "train", "all"], default=None,
                   help="default: held-out problems (test); the whole file for JSONL tasks")
    p.add_argument("--n", type=int, default=1, help="samples per problem for pass@k and maj@k")
    p.add_argument("--greedy", action="store_true", help="also report greedy pass@1 when --n > 1")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the full result as JSON here")
    p.add_argument("--json", action="store_true", help="print the overall figures as one JSON line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("distill", help="rejection-sample a teacher's reasoning traces and train a student on them")
    p.add_argument("--recipe", required=True, help="recipe with a [distill] section (and [student] for a fresh one)")
    p.add_argument("--teacher", default=None, help="teacher model directory or OpenAI-compatible base URL")
    p.add_argument("--student", default=None, help="student checkpoint directory or config.json (default: [student])")
    p.add_argument("--task", default=None, help="task family or JSONL task file (default: the recipe's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("serve", help="OpenAI/DeepSeek-compatible HTTP API and web chat page")
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Bearer auth (or set NANOSEEK_API_KEY)")
    p.add_argument("--api-keys", default=None,
                   help="TOML file of API keys (name, key_sha256, models, limits, quotas): many users")
    p.add_argument("--ledger", default=None, help="SQLite file of per-request usage (GET /v1/usage)")
    p.add_argument("--admin-key", default=None, help="enables /admin/weights (a trainer pushes new weights: GRPO "
                                                      "rollout servers); or set NANOSEEK_ADMIN_KEY")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--policy", default=None, help="policy TOML (moderation rules, system prompt, limits)")
    p.add_argument("--cost-per-hour", type=float, default=None, help="machine price in USD/hour: enables pricing")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--cors", default="", help="comma-separated allowed origins (CORS is off by default)")
    p.add_argument("--shutdown-grace", type=int, default=10, help="seconds in-flight requests get on SIGTERM")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a model for another runtime: gguf (llama.cpp, Ollama)")
    p.add_argument("format", choices=["gguf"])
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("out", help="the .gguf file to write (an Ollama Modelfile is written beside it)")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="tensor type of the matrices (norms, biases and routers stay f32)")
    p.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="write a weight-only quantized checkpoint (int8, int4) that loads as is")
    p.add_argument("src", help="checkpoint directory (or .gguf file) to quantize")
    p.add_argument("dst", help="directory to write")
    p.add_argument("--scheme", default="int8", choices=["int8", "int4", "int4-g128"],
                   help="int8 per output channel, int4 in groups of 32 inputs (or 128)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (never the source)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("usage", help="per-key totals of a server's usage ledger")
    p.add_argument("db", help="the ledger file given to serve --ledger")
    p.add_argument("--start", default=None, help="from (unix seconds or ISO date, UTC)")
    p.add_argument("--end", default=None, help="until, exclusive (unix seconds or ISO date, UTC)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("keys", help="API keys for serve --api-keys")
    p.add_argument("action", choices=["hash", "new"], help="hash: the key_sha256 of KEY; new: a fresh random key "
                                                           "and its hash")
    p.add_argument("key", nargs="?", default=None)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("report", help="write runs/NAME/report.md from a finished run")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/speedrun")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # recipe overrides may follow the options: `train sft --recipe R sft.steps=10`
        if getattr(args, "command", None) not in ("train", "distill") or not all(
                "=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except NanoseekError as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
