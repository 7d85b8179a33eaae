"""Tokenizer: HF `tokenizers` plus tokenizer_config.json conventions and jinja2 chat templates.

Chat templates render exactly as transformers' `apply_chat_template` does (sandboxed jinja2 with trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a non-ASCII-escaping `tojson`), and the
rendered text is tokenized without adding special tokens again, so prompt ids are identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

from .errors import ConfigError


def _token_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class Tokenizer:
    def __init__(self, backend, config: dict | None = None, chat_template: str | None = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.config = config or {}
        self.chat_template = chat_template
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.unk_token = _token_text(self.config.get("unk_token"))

    # ---- loading ----
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise ConfigError(f"no tokenizer.json in {path}: nanoseek needs a fast (tokenizers) tokenizer file")
        backend = Backend.from_file(str(file))
        config = {}
        if (path / "tokenizer_config.json").exists():
            config = json.loads((path / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (path / "chat_template.jinja").exists():  # transformers 5 writes the template here
            template = (path / "chat_template.jinja").read_text()
        return cls(backend, config, template)

    # ---- ids ----
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @cached_property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Many texts at once, in parallel across cores. The batch entry point releases the GIL while it works
        (the single-text `encode` holds it: a 1 MB prompt tokenized on a server's worker thread stalled its event
        loop 0.6 s) and, without offsets, is also faster."""
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @cached_property
    def _byte_decoder(self) -> dict[str, int] | None:
        """GPT-2's printable-character alphabet -> byte, when the tokenizer is byte-level BPE."""
        from tokenizers import decoders

        if not isinstance(self.backend.decoder, decoders.ByteLevel):
            return None
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        chars, extra = list(printable), 0
        for b in range(256):
            if b not in printable:
                printable.append(b)
                chars.append(256 + extra)
                extra += 1
        return {chr(c): b for b, c in zip(printable, chars)}

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a byte-level token may be part of a UTF-8 character)."""
        cache = self.__dict__.setdefault("_token_bytes", {})
        if token_id not in cache:
            piece = self.backend.id_to_token(token_id)
            table = self._byte_decoder
            if piece is not None and table is not None and token_id not in self.special_ids and all(
                    ch in table for ch in piece):
                cache[token_id] = bytes(table[ch] for ch in piece)
            else:
                cache[token_id] = self.decode([token_id]).encode("utf-8")
        return cache[token_id]

    # ---- chat ----
    @cached_property
    def _compiled_template(self):
        from jinja2 import ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ConfigError(f"chat template error: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ConfigError("this tokenizer has no chat template (tokenizer_config.json chat_template or "
                              "chat_template.jinja): pass plain text prompts instead")
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "", unk_token=self.unk_token or "",
            **kwargs)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = True,
                            **kwargs):
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(path: str | Path) -> Tokenizer:
    from .checkpoint import model_directory

    return Tokenizer.from_pretrained(model_directory(path))


# ---------------------------------------------------------------- training a tokenizer
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# DeepSeek-R1's template, shortened: system prompt first; past assistant turns keep only their answer (the
# reasoning is dropped, as R1 does); the generation prompt opens <think> so the model starts reasoning.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def train_tokenizer(texts, vocab_size: int, directory: str | Path, model_max_length: int = 4096) -> Tokenizer:
    """Byte-level BPE trained on `texts` (an iterable of strings), with DeepSeek's special tokens.

    Digits are split one per token before BPE: small models learn arithmetic far better when every digit is
    its own token (multi-digit tokens hide the place value). `<think>`/`</think>` are added tokens that are not
    "special", so decoded text keeps them and the reasoning split can see them.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    specials = [BOS, EOS, PAD, USER, ASSISTANT]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens([AddedToken(THINK_OPEN, special=False, normalized=False),
                        AddedToken(THINK_CLOSE, special=False, normalized=False)])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos_id)])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2, ensure_ascii=False) + "\n")
    return Tokenizer.from_pretrained(directory)
