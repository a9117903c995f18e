"""benchmarks/verify_hf_export.py on a tiny Qwen2: plain transformers with the exported config answers as polykv."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from conftest import tiny_qwen2
from test_export import save_plan, win

from polykv.models import fingerprint

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("verify_hf_export", ROOT / "benchmarks" / "verify_hf_export.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory, tiny_hf_dir):
    """A tiny random Qwen2 saved as a Hugging Face directory, with the tiny WordLevel tokenizer (same vocab)."""
    path = tmp_path_factory.mktemp("tiny-qwen") / "qwen"
    tiny_qwen2().save_pretrained(path)
    for f in Path(tiny_hf_dir).iterdir():
        if "token" in f.name:
            shutil.copy(f, path / f.name)
    return path


def test_exported_config_answers_as_polykv_run(tmp_path, tiny_qwen_dir):
    script = load_script()
    fp = fingerprint(tiny_qwen2().config)
    plan = save_plan(tmp_path / "p.json", fp, [win(4), ("full", 64, {})], {"engine": "hf", "reference_context": 64})
    context = "alpha beta gamma delta The key is 4 1 7 . " * 3
    verdict = script.verify(plan, str(tiny_qwen_dir), context, "What is the key ?", max_new_tokens=24)
    assert verdict.layer_types == ["sliding_attention", "full_attention"] and verdict.sliding_window == 4
    assert verdict.polykv_text and verdict.equal, (verdict.polykv_text, verdict.transformers_text)
    # the check can fail: the same model without the exported overrides answers otherwise
    plain = script.verify(plan, str(tiny_qwen_dir), context, "What is the key ?", max_new_tokens=24, overrides={})
    assert plain.layer_types == ["full_attention"] * 2 and not plain.equal
