"""The `nanoseek` command line. Each subcommand parses its flags here and calls into the library.

Errors a user can fix (NanoseekError) print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import NanoseekError


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def cmd_inspect(args) -> int:
    from pathlib import Path

    from .checkpoint import find_checkpoint_files, mtp_depths_in_checkpoint
    from .model.accounting import model_cost
    from .presets import resolve_config

    config = resolve_config(args.model)
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


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF format)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps, xpu or auto")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32 or bfloat16")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV cache budget, e.g. 512MiB")
    p.add_argument("--max-model-len", type=int, default=None)


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
               max_model_len=args.max_model_len)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek system as one small package.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameters, active parameters, KV-cache bytes and FLOPs of a model")
    p.add_argument("model", help="model directory, config.json, or a preset "
                                 "(deepseek-v3, deepseek-v2-lite, deepseek-r1-distill-qwen-1.5b)")
    p.add_argument("--context", type=int, default=4096, help="context length for the attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
