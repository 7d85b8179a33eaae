"""Hugging Face checkpoint directories <-> nanoseek Transformers.

Loading streams tensors one at a time from memory-mapped safetensors files (single file or sharded with
`model.safetensors.index.json`) into a model allocated without initialisation, so peak RAM stays close to the
model's own size. FP8 block-quantized weights (float8_e4m3fn + `weight_scale_inv`, 128x128 blocks) are
dequantized on the way in. Checking is strict: every missing, unexpected or mis-shaped tensor is reported in
one error, except MTP layers that a config asks for but the checkpoint lacks (transformers' own
`save_pretrained` writes exactly that), which load with MTP switched off.

Saving writes an HF directory transformers loads: per-expert tensors, MTP layers as `model.layers.{L+k}`,
shards above `max_shard_size`, config.json, generation_config.json and the tokenizer files, atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError, NanoseekError
from .model import quant
from .model.transformer import Transformer
from .model import build_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FP8_BLOCK = 128
_EXPERT = re.compile(r"^(.*\.(?:mlp|ffn)\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_V4_PART = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # DeepSeek-V4's expert names
# DeepSeek-V4's release names outside `model.` (transformers accepts both; save_pretrained writes these under it)
_V4_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight", "hc_head_fn": "model.hc_head.hc_fn",
           "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Keys some checkpoints carry that hold no weights we need.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|^model\.layers\.\d+\.self_attn\.rotary_emb)")


# ---------------------------------------------------------------- FP8 blocks
def fp8_block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """float8 weight [out, in] x per-block scale [ceil(out/128), ceil(in/128)] -> dtype (edge blocks partial).

    The stored scale is multiplied in, despite its name: w = fp8 * scale_inv (DeepSeek's `weight_dequant`).
    """
    out_f, in_f = weight.shape
    expected = (math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"FP8 scale shape {tuple(scale_inv.shape)} does not fit weight {tuple(weight.shape)}: "
                              f"expected {expected} for {FP8_BLOCK}x{FP8_BLOCK} blocks")
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    return (weight.float() * scale).to(dtype)


FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_BLOCK = 32  # DeepSeek-V4's FP4 experts: one scale per 32 inputs of a row


def fp4_block_dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """DeepSeek-V4's FP4 expert weights: packed [out, in/2] bytes, two e2m1 codes each (the low nibble first),
    times one scale per 32 inputs ([out, in/32], ue8m0 or float; raw uint8 exponents are 2^(b - 127))."""
    codes = packed.contiguous().view(torch.uint8)
    table = torch.tensor(FP4_E2M1, dtype=torch.float32)
    values = torch.stack((table[(codes & 0xF).long()], table[(codes >> 4).long()]), dim=-1).flatten(-2)
    factors = (scale.float() - 127.0).exp2() if scale.dtype == torch.uint8 else scale.float()
    if tuple(factors.shape) != (values.shape[0], values.shape[1] // FP4_BLOCK):
        raise CheckpointError(f"FP4 scale shape {tuple(scale.shape)} does not fit weight {tuple(values.shape)}: "
                              f"expected one scale per {FP4_BLOCK} inputs of each row")
    return (values * factors.repeat_interleave(FP4_BLOCK, dim=1)).to(dtype)


def _block_scale_key(key: str, files: "CheckpointFiles") -> str | None:
    """The scale beside a block-quantized weight: V3's `weight_scale_inv`, or DeepSeek-V4's `scale`."""
    stem = key[: -len("weight")] if key.endswith(".weight") else None
    for candidate in ((stem + "weight_scale_inv", stem + "scale") if stem else ()):
        if candidate in files.key_to_file:
            return candidate
    return None


def fp8_block_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8_e4m3fn weight, float32 scale_inv per 128x128 block), DeepSeek's format."""
    out_f, in_f = weight.shape
    rows, cols = math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK)
    padded = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK, dtype=torch.float32)
    padded[:out_f, :in_f] = weight.float()
    blocks = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q, scale


# ---------------------------------------------------------------- key mapping
@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a parameter/buffer name, optionally one expert's slice of a stack."""
    name: str
    expert: int | None = None
    part: str | None = None  # gate_proj | up_proj | down_proj for stacked experts


def map_key(key: str, config: ModelConfig) -> Target | None:
    """Checkpoint key -> Target in a nanoseek Transformer; None for keys that are shared copies (MTP embedding
    and head) and are not stored separately."""
    L = config.num_hidden_layers
    if config.is_v4:
        key = _V4_TOP.get(key, "model." + key if key.startswith("layers.") else key)
        key = key.replace(".kv_norm.", ".norm.")  # the release's spelling of the attention's key norm
        # V4's MTP depths keep their release names, `mtp.{k}.*` (the embedding and head are the model's)
    m = _LAYER.match(key)
    if m and int(m.group(1)) >= L:
        k, rest = int(m.group(1)) - L, m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # DeepSeek-V3 stores copies of the shared embedding and head per MTP layer
        if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            return Target(f"mtp.{k}.{rest}")
        if rest == "shared_head.norm.weight":
            return Target(f"mtp.{k}.shared_head_norm.weight")
        key = f"mtp.{k}.block.{rest}"
    e = _EXPERT.match(key)
    if e:
        part = _V4_PART.get(e.group(3), e.group(3))
        stack = "down_proj" if part == "down_proj" else "gate_up_proj"
        return Target(f"{e.group(1)}.{stack}", int(e.group(2)), part)
    return Target(key)


def _rotary_table(name: str) -> bool:
    """The rotary frequencies (`rotary`, V4's `compress_rotary`): rebuilt from the config, never stored."""
    return name.split(".", 1)[0].endswith("rotary")


QUANT_SCALE_SUFFIX = "_scale"  # `X.weight_scale` beside the integers of a quantized `X.weight`


def quantized_parameters(model: Transformer) -> dict[str, quant.QuantizedWeight]:
    """Parameter name -> its QuantizedWeight, for the weights a quantized model keeps as integers and has not
    changed since (a weight trained further is written as the float it now is)."""
    found = {}
    if not hasattr(model, "named_modules"):  # a trainer's gathered snapshot (train/checkpointing.py): never quantized
        return found
    for module_name, module in model.named_modules():
        for name, qw in (getattr(module, "quantized", None) or {}).items():
            if qw.current(getattr(module, name)):
                found[f"{module_name}.{name}" if module_name else name] = qw
    return found


def iter_checkpoint_tensors(model: Transformer) -> Iterator[tuple[str, callable, tuple, torch.dtype]]:
    """(checkpoint key, thunk producing the tensor, shape, dtype) for every tensor a saved checkpoint holds."""
    config = model.config
    L = config.num_hidden_layers
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers()))
    quantized = quantized_parameters(model)
    for name, tensor in named.items():
        if _rotary_table(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        key = "head.weight" if name == "lm_head.weight" and config.is_v4 else name
        names = ("w1", "w3", "w2") if config.is_v4 else ("gate_proj", "up_proj", "down_proj")
        if name.startswith("mtp.") and not config.is_v4:
            _, k, rest = name.split(".", 2)
            prefix = f"model.layers.{L + int(k)}."
            if rest.startswith("block."):
                rest = rest[len("block."):]
            elif rest == "shared_head_norm.weight":
                rest = "shared_head.norm.weight"
            key = prefix + rest
        # A quantized weight is written as its integers under the weight's key and its scales beside them.
        variants = [("", tensor)]
        if name in quantized:
            variants = [("", quantized[name].stored()), (QUANT_SCALE_SUFFIX, quantized[name].scales)]
        for suffix, t in variants:
            if key.endswith("experts.gate_up_proj"):
                base, I = key[: -len("gate_up_proj")], t.shape[1] // 2
                for ex in range(t.shape[0]):
                    for part, rows in ((names[0], slice(None, I)), (names[1], slice(I, None))):
                        yield (f"{base}{ex}.{part}.weight{suffix}", (lambda t=t, ex=ex, rows=rows: t[ex, rows]),
                               (I, t.shape[2]), t.dtype)
            elif key.endswith("experts.down_proj"):
                base = key[: -len("down_proj")]
                for ex in range(t.shape[0]):
                    yield (f"{base}{ex}.{names[2]}.weight{suffix}", (lambda t=t, ex=ex: t[ex]), tuple(t.shape[1:]),
                           t.dtype)
            else:
                yield key + suffix, (lambda t=t: t), tuple(t.shape), t.dtype
    # vLLM and DeepSeek's V3 layout keep a copy of the shared embedding and head inside each MTP layer.
    for k in range(0 if config.is_v4 else len(model.mtp)):
        prefix = f"model.layers.{L + k}."
        emb = named["model.embed_tokens.weight"]
        head = named.get("lm_head.weight", emb)
        yield prefix + "embed_tokens.weight", (lambda t=emb: t), tuple(emb.shape), emb.dtype
        yield prefix + "shared_head.head.weight", (lambda t=head: t), tuple(head.shape), head.dtype


# ---------------------------------------------------------------- loading
@dataclass
class CheckpointFiles:
    directory: Path
    key_to_file: dict[str, Path]
    handles: dict[Path, object] = field(default_factory=dict)
    readers: dict[Path, object] = field(default_factory=dict)

    def open(self, file: Path):
        if file not in self.handles:
            try:
                self.handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"cannot read {file}: {e}; the file is truncated or corrupt, re-download "
                                      "or re-save it") from None
        return self.handles[file]

    def reader(self, file: Path):
        """A handle that reads tensor data with pread into fresh buffers: unlike mmap, pages already copied
        into the model are not kept resident as well, so peak RSS stays near the model's size."""
        if file not in self.readers:
            try:
                self.readers[file] = safe_open(str(file), framework="pt", device="cpu", backend="pread")
            except TypeError:  # safetensors < 0.8 has no pread backend
                self.readers[file] = self.open(file)
        return self.readers[file]

    def tensor(self, key: str) -> torch.Tensor:
        try:
            self.open(self.key_to_file[key])  # validates the header with a clear error first
            return self.reader(self.key_to_file[key]).get_tensor(key)
        except NanoseekError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.key_to_file[key]}: {e}; the file is "
                                  "truncated or corrupt") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.open(self.key_to_file[key]).get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        return self.open(self.key_to_file[key]).get_slice(key).get_dtype()


def find_checkpoint_files(directory: str | Path) -> CheckpointFiles:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory: pass a Hugging Face model directory")
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed ({e}); re-save the checkpoint") from None
        files = {k: directory / v for k, v in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.exists()})
        if missing:
            raise CheckpointError(f"{directory} is missing shard file(s) {', '.join(missing)} named in its index")
        ckpt = CheckpointFiles(directory, files)
        return ckpt
    singles = sorted(directory.glob("*.safetensors"))
    if singles:
        ckpt = CheckpointFiles(directory, {})
        for f in singles:
            for k in ckpt.open(f).keys():
                ckpt.key_to_file[k] = f
        return ckpt
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}), which nanoseek refuses because loading "
            "pickle can run arbitrary code; convert to safetensors first, e.g. `python -c \"from transformers import "
            "AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('OUT')\"`"
        )
    raise CheckpointError(f"{directory} has no *.safetensors weights")


def mtp_depths_in_checkpoint(keys, config: ModelConfig) -> int:
    if config.is_v4:  # `mtp.{k}.*`
        return len({k.split(".")[1] for k in keys if k.startswith("mtp.")})
    L = config.num_hidden_layers
    depths = {int(m.group(1)) - L for k in keys if (m := _LAYER.match(k)) and int(m.group(1)) >= L}
    return len(depths)


def model_directory(path: str | Path) -> Path:
    """`path` as a checkpoint directory: a GGUF file becomes its converted directory (interop/gguf_import.py)."""
    if str(path).endswith(".gguf"):
        from .interop.gguf_import import cached_checkpoint

        if not Path(path).is_file():
            raise CheckpointError(f"{path} does not exist")
        return cached_checkpoint(path)
    return Path(path)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               use_mtp: bool = True) -> Transformer:
    """Loads an HF checkpoint directory (or a GGUF file) into a nanoseek Transformer (see the module docstring)."""
    path = model_directory(path)
    config = ModelConfig.from_pretrained(path)
    files = find_checkpoint_files(path)
    keys = list(files.key_to_file)
    present = mtp_depths_in_checkpoint(keys, config)
    mtp_note = None
    if config.num_nextn_predict_layers and present == 0:
        mtp_note = (f"config asks for {config.num_nextn_predict_layers} MTP layer(s) but the checkpoint holds no MTP "
                    "tensors: MTP is off")
        config = config.replace(num_nextn_predict_layers=0)
    elif present > config.num_nextn_predict_layers:
        raise CheckpointError(f"checkpoint holds {present} layer(s) beyond num_hidden_layers="
                              f"{config.num_hidden_layers} but config.num_nextn_predict_layers is "
                              f"{config.num_nextn_predict_layers}: fix config.json")
    elif not use_mtp and config.num_nextn_predict_layers:
        mtp_note = "MTP layers present but not loaded (use_mtp=False)"
        config = config.replace(num_nextn_predict_layers=0)
        keys = [k for k in keys if not ((m := _LAYER.match(k)) and int(m.group(1)) >= config.num_hidden_layers)
                and not (config.is_v4 and k.startswith("mtp."))]

    model = _allocate(config, device, dtype)
    scheme = quant.scheme_from_config(config.extra.get("quantization_config"))
    _stream_into(model, files, keys, dtype, scheme)
    if scheme is not None:
        model.quantization = scheme
    if any(files.dtype_name(k) == "F8_E4M3" for k in keys if k.endswith(".weight")):
        config.extra.pop("quantization_config", None)  # the loaded weights are dequantized
    model.config = config
    model.checkpoint_dir = path
    model.mtp_note = mtp_note
    return model.eval()


def _allocate(config: ModelConfig, device, dtype) -> Transformer:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build_model(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty allocates each module's tensors anew, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.make_rotary()  # non-persistent buffers are not in checkpoints
    return model.to(device)


def _stream_into(model: Transformer, files: CheckpointFiles, keys: list[str], dtype: torch.dtype,
                 scheme: quant.Scheme | None = None) -> None:
    config = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    # What must be filled: every tensor, and every expert slice of stacked experts.
    needed: dict[tuple, tuple] = {}
    for name, t in params.items():
        if _rotary_table(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name.endswith("experts.gate_up_proj"):
            for e in range(t.shape[0]):
                needed[(name, e, "gate_proj")] = (t.shape[1] // 2, t.shape[2])
                needed[(name, e, "up_proj")] = (t.shape[1] // 2, t.shape[2])
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                needed[(name, e, "down_proj")] = tuple(t.shape[1:])
        else:
            needed[(name, None, None)] = tuple(t.shape)

    scale_keys = {k for k in keys if k.endswith("_scale_inv") or k.endswith(".weight" + QUANT_SCALE_SUFFIX)
                  or (config.is_v4 and k.endswith(".scale") and k[: -len("scale")] + "weight" in files.key_to_file)}
    unexpected, misshaped, filled = [], [], set()
    loaded: dict[tuple, quant.QuantizedWeight] = {}  # slot -> the integers of a quantized checkpoint
    for key in keys:
        if key in scale_keys or _IGNORED.search(key):
            continue
        target = map_key(key, config)
        if target is None:
            continue
        if target.name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints still carry the head; the embedding is authoritative
        slot = (target.name, target.expert, target.part)
        if slot not in needed:
            unexpected.append(key)
            continue
        shape = files.shape(key)
        integers = files.dtype_name(key) in ("I8", "U8")
        block_scale = _block_scale_key(key, files)
        fp4 = integers and config.is_v4 and block_scale is not None
        if fp4:
            shape = (*shape[:-1], shape[-1] * 2)  # DeepSeek-V4's FP4 experts: two e2m1 values per byte
        elif integers:
            if scheme is None:
                raise CheckpointError(f"{key} holds integers but config.json has no nanoseek quantization_config: "
                                      "write quantized checkpoints with `nanoseek quantize`")
            if scheme.bits == 4:
                shape = (*shape[:-1], shape[-1] * 2)  # two int4 values per byte
        if shape != needed[slot]:
            misshaped.append(f"{key}: checkpoint {list(shape)} vs model {list(needed[slot])}")
            continue
        filled.add(slot)
        if misshaped or unexpected:
            continue  # already failing: keep scanning for the full report without reading data
        tensor = files.tensor(key)
        if fp4:
            tensor = fp4_block_dequantize(tensor, files.tensor(block_scale))
        elif tensor.dtype == torch.float8_e4m3fn:
            if block_scale is None:
                raise CheckpointError(f"{key} is float8 but its scale ({key[:-len('weight')]}weight_scale_inv) "
                                      "is missing")
            tensor = fp8_block_dequantize(tensor, files.tensor(block_scale), torch.float32)
        elif integers:
            scale_key = key + QUANT_SCALE_SUFFIX
            if scale_key not in files.key_to_file:
                raise CheckpointError(f"{key} holds integers but {scale_key} is missing")
            loaded[slot] = quant.QuantizedWeight.from_stored(tensor, files.tensor(scale_key), scheme.bits)
            tensor = loaded[slot].dequantize()
        dest = params[target.name]
        if target.expert is not None:
            dest = dest[target.expert]
            if target.part != "down_proj":
                half = dest.shape[0] // 2
                dest = dest[:half] if target.part == "gate_proj" else dest[half:]
        with torch.no_grad():
            dest.copy_(tensor.to(dest.dtype))
    missing = [_slot_key(s, config) for s in needed if s not in filled]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise CheckpointError(f"checkpoint {files.directory} does not match its config.json ({'; '.join(parts)})")
    _attach_quantized(model, loaded)


def _attach_quantized(model: Transformer, loaded: dict[tuple, "quant.QuantizedWeight"]) -> None:
    """Keeps the integers a quantized checkpoint held beside the dequantized parameters (model/quant.py); the
    routed experts' slices are stacked back as the model stores them."""
    stacks: dict[str, dict] = {}
    for (name, expert, part), qw in loaded.items():
        if expert is None:
            module_name, param = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            if not getattr(module, "quantized", None):
                module.quantized = {}
            module.quantized[param] = qw.attached_to(getattr(module, param))
        else:
            stacks.setdefault(name, {})[(expert, part)] = qw
    for name, parts in stacks.items():
        module_name, param = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        order = ("down_proj",) if param == "down_proj" else ("gate_proj", "up_proj")
        wanted = [(e, p) for e in range(getattr(module, param).shape[0]) for p in order]
        if any(w not in parts for w in wanted):
            continue  # some experts were stored in float: the stack stays float
        per_expert = [[parts[(e, p)] for p in order] for e in range(len(wanted) // len(order))]
        q = torch.stack([torch.cat([x.q for x in row]) for row in per_expert])
        scales = torch.stack([torch.cat([x.scales for x in row]) for row in per_expert])
        if not getattr(module, "quantized", None):
            module.quantized = {}
        module.quantized[param] = quant.QuantizedWeight(q, scales, per_expert[0][0].bits).attached_to(
            getattr(module, param))


def _slot_key(slot: tuple, config: ModelConfig) -> str:
    name, expert, part = slot
    if expert is not None:
        name = f"{name.rsplit('.', 1)[0]}.{expert}.{part}.weight"
    if name.startswith("mtp.") and not config.is_v4:
        _, k, rest = name.split(".", 2)
        rest = rest.replace("block.", "", 1).replace("shared_head_norm", "shared_head.norm")
        name = f"model.layers.{config.num_hidden_layers + int(k)}.{rest}"
    return name


# ---------------------------------------------------------------- saving
def save_model(model: Transformer, directory: str | Path, *, tokenizer_from: str | Path | None = None,
               dtype: torch.dtype | None = None, max_shard_size: int = 4 * 1024 ** 3,
               generation_config: dict | None = None, extra=None) -> Path:
    """Writes `model` as an HF directory, atomically: into a temporary sibling, then renamed into place.
    `extra(tmp_dir)` may add files (a trainer's state) before the rename, so they land atomically too."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_weights(model, tmp, dtype, max_shard_size)
        config = model.config.replace(
            torch_dtype=str(dtype or model.dtype).removeprefix("torch."), extra=dict(model.config.extra))
        config.save(tmp)
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        if config.pad_token_id is not None:
            gen["pad_token_id"] = config.pad_token_id
        gen.update(generation_config or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        source = tokenizer_from or getattr(model, "checkpoint_dir", None)
        if source is not None:
            for name in TOKENIZER_FILES:
                if (Path(source) / name).exists():
                    shutil.copy2(Path(source) / name, tmp / name)
        if extra is not None:
            extra(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(new: Path, target: Path) -> None:
    """Puts `new` at `target`; an existing target is moved aside first and removed only after the swap."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_weights(model: Transformer, directory: Path, dtype, max_shard_size: int) -> None:
    entries = list(iter_checkpoint_tensors(model))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        key, _, shape, t_dtype = entry
        out_dtype = t_dtype if (dtype is None or not t_dtype.is_floating_point
                                or t_dtype == torch.float32 and _keep_fp32(key)) else dtype
        nbytes = math.prod(shape) * torch.empty((), dtype=out_dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, entry[1], out_dtype))
        size += nbytes
    total = 0
    weight_map = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors, pointers = {}, set()
        for key, thunk, out_dtype in shard:
            t = thunk().detach().to("cpu", out_dtype).contiguous()
            # safetensors refuses tensors that share memory (expert slices of one stack, MTP's embedding copy).
            if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.data_ptr() in pointers:
                t = t.clone()
            pointers.add(t.data_ptr())
            tensors[key] = t
            total += t.numel() * t.element_size()
            weight_map[key] = name
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _keep_fp32(key: str) -> bool:
    """Routing tensors (and V3.2's indexer head weights) stay float32 on disk, as in DeepSeek's and
    transformers' checkpoints; so do the scales of quantized weights."""
    return (key.endswith("mlp.gate.weight") or key.endswith("e_score_correction_bias")
            or key.endswith("indexer.weights_proj.weight")
            or key.endswith(".weight" + QUANT_SCALE_SUFFIX) or _V4_FP32.search(key) is not None)


# What DeepSeek-V4 keeps in float32 (transformers' _keep_in_fp32_modules_strict): routing, sinks, slot biases,
# hyper-connections and norms.
_V4_FP32 = re.compile(r"(ffn\.gate\.(weight|bias)|attn_sink|\.ape|hc_(attn|ffn)_(fn|base|scale)|"
                      r"hc_head\.hc_(fn|base|scale)|hc_head_(fn|base|scale)|"
                      r"attn\.(q_norm|norm|compressor\.norm|indexer\.compressor\.norm)\.weight|"
                      r"(attn_norm|ffn_norm)\.weight)$")
