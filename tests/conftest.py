"""Shared fixtures: tiny random models (mechanics) and the bundled real model (behaviour).

Triton's CPU interpreter must be enabled before any @triton.jit function is defined, so it is set here, first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(int(os.environ.get("POLYKV_TEST_THREADS", "2")))


def tiny_llama(attn: str = "sdpa", layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(attn: str = "sdpa", seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=1024,
    )
    cfg._attn_implementation = attn
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gemma3(attn: str = "sdpa", seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8, max_position_embeddings=1024,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    cfg._attn_implementation = attn
    return Gemma3ForCausalLM(cfg).eval()


TINY = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


@pytest.fixture(params=["sdpa", "eager"])
def attn(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M (dequantized once into the polykv cache)."""
    from polykv.models import load_model

    return load_model("smollm2-135m")


class CharTokenizer:
    """A tiny offline tokenizer for mechanics tests: one id per byte (mod vocab), no chat template."""

    chat_template = None
    eos_token = "\x03"
    eos_token_id = 3
    pad_token = "\x00"

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [4 + (b % (self.vocab - 4)) for b in text.encode()]
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i >= 4)


def tiny_loaded(attn: str = "sdpa", arch: str = "llama"):
    from polykv.models import LoadedModel

    return LoadedModel(name=f"tiny-{arch}", model=TINY[arch](attn), tokenizer=CharTokenizer(), source="test")


def write_samples(path, n: int = 3, length: int = 300, seed: int = 0) -> None:
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(length // 6))
            key = rng.randint(100, 999)
            f.write(json.dumps({"id": f"s{i}", "category": ["retrieval", "code"][i % 2], "context":
                                f"{words} The key is {key}. {words}", "question": "What is the key?",
                                "answers": [str(key)]}) + "\n")
