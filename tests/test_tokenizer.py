"""nanoseek's tokenizer gives the same ids as transformers' AutoTokenizer, chat templates included."""

import pytest

from nanoseek.errors import ConfigError
from nanoseek.tokenizer import load_tokenizer
from tiny import build_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>greet</think>Hello!"}, {"role": "user", "content": "Ünïcödé 🙂?"}],
]


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    build_tokenizer(directory)
    return load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_ids_match_transformers(tokenizers_pair, conversation, add_generation_prompt):
    ours, theirs = tokenizers_pair
    expected = theirs.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True,
                                          return_dict=False)
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == list(expected)
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == theirs.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                              tokenize=False)
    if add_generation_prompt:
        assert text.endswith("<｜Assistant｜><think>\n")


def test_encode_decode_match_transformers(tokenizers_pair):
    ours, theirs = tokenizers_pair
    for text in ["plain text", "Ünïcödé 🙂 数字", "a<think>b</think>c"]:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text.replace("<think>", "").replace(
            "</think>", "")
    assert ours.bos_token_id == theirs.bos_token_id and ours.eos_token_id == theirs.eos_token_id


def test_missing_chat_template_is_a_clear_error(tmp_path):
    build_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    import json

    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="no chat template"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
