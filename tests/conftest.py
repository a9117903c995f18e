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
        vocab_size=128,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(attn: str = "sdpa", seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=1024,
    )
    cfg._attn_implementation = attn
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gemma3(attn: str = "sdpa", seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,
        max_position_embeddings=1024,
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
            f.write(
                json.dumps(
                    {
                        "id": f"s{i}",
                        "category": ["retrieval", "code"][i % 2],
                        "context": f"{words} The key is {key}. {words}",
                        "question": "What is the key?",
                        "answers": [str(key)],
                    }
                )
                + "\n"
            )


# --- a tiny model on disk, for the real CLI in subprocesses (crash/resume, torchrun) ----------------------------------

WORDS = "alpha beta gamma delta The the key is What Question Answer . ? : , !".split() + list("0123456789")


def save_tiny_hf(path, layers: int = 3, seed: int = 0):
    """Save `tiny_llama` and a WordLevel tokenizer over its 128-token vocab (no chat template) as a local HF dir."""
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    model = tiny_llama(layers=layers, seed=seed)
    vocab = ["<pad>", "<s>", "<unk>", "</s>", *WORDS]
    vocab += [f"w{i}" for i in range(model.config.vocab_size - len(vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(path)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny-hf") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-data") / "data.jsonl"
    write_samples(path, n=3)
    return path


# Small enough for a few seconds per run on a shared CPU.
CAL_ARGS = ("--max-context", "256", "--budgets", "8,32", "--policies", "streaming,snapkv,knorm")


def cli_env(**extra) -> dict:
    """The environment for `polykv` subprocesses: one thread (deterministic, and kind to a shared machine)."""
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "POLYKV_TEST_KILL_AT"}
    env.update(
        OMP_NUM_THREADS="1",
        POLYKV_TEST_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def calibrate_cli(model_dir, data, out, *more, env: dict | None = None, timeout: float = 300):
    """Run the real `python -m polykv_cli calibrate` on the tiny model in a subprocess; the CompletedProcess."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "polykv_cli",
        "calibrate",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        *CAL_ARGS,
        *more,
    ]
    return subprocess.run(cmd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def assert_same_calibration(a, b, exact: bool = True) -> None:
    """Same files; same run.json; same metadata but timings/machine; Parquet parts equal (bytes when `exact`)."""
    import json
    from pathlib import Path

    import pandas as pd

    a, b = Path(a), Path(b)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert (a / "run.json").read_bytes() == (b / "run.json").read_bytes()
    meta_a, meta_b = (json.loads((d / "metadata.json").read_text()) for d in (a, b))
    for meta in (meta_a, meta_b):
        meta.pop("timings"), meta.pop("machine")
    assert meta_a == meta_b
    for name in files:
        if not name.endswith(".parquet"):
            continue
        if exact:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        else:
            pd.testing.assert_frame_equal(pd.read_parquet(a / name), pd.read_parquet(b / name), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def reference_calibration(tiny_hf_dir, tiny_data, tmp_path_factory):
    """An uninterrupted single-process `polykv calibrate` of the tiny model (the crash and torchrun reference)."""
    out = tmp_path_factory.mktemp("reference") / "cal"
    result = calibrate_cli(tiny_hf_dir, tiny_data, out)
    assert result.returncode == 0, result.stderr
    return out
