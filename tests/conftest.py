import os

import pytest

import nanoseek  # noqa: F401  first: it applies the ISA ceiling (NANOSEEK_ISA) before torch's first operation
import torch

# Two cores: keep torch from oversubscribing them when pytest runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny import ARCHITECTURES, build_tokenizer, save_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """arch -> (directory, transformers model) of a tiny real checkpoint, built once per session."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            directory = tmp_path_factory.mktemp(arch)
            model = save_hf_checkpoint(arch, directory)
            cache[arch] = (directory, model)
        return cache[arch]

    return get


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """arch -> directory of a tiny checkpoint with a real tokenizer (DeepSeek specials, R1 chat template)."""
    cache = {}

    def get(arch: str = "deepseek_v3"):
        if arch not in cache:
            directory = tmp_path_factory.mktemp(f"chat_{arch}")
            model = save_hf_checkpoint(arch, directory, vocab_size=320, max_position_embeddings=8192)
            build_tokenizer(directory, vocab_size=300)
            cache[arch] = (directory, model)
        return cache[arch]

    return get
