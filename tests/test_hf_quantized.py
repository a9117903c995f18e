"""`hf-quant:<bits>`: transformers' QuantizedCache (quanto backend) as the external anchor of `quant:<bits>`.

Parsing and the missing-backend message run everywhere; the rest needs optimum-quanto (`polykv[quant-anchor]`).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import tiny_loaded
from typer.testing import CliRunner

from polykv.errors import InputError
from polykv.evaluate import hf_quantized
from polykv.evaluate.engine import evaluate_instance
from polykv.evaluate.methods import parse_methods, require_backends
from polykv.evaluate.tasks import TaskInstance
from polykv.prompts import encode

needs_quanto = pytest.mark.skipif(
    importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None,
    reason="optimum-quanto is not installed (pip install 'polykv[quant-anchor]')",
)


def _stored_bytes(tokens: int, layers: int, heads: int, head_dim: int, bits: int, itemsize: int) -> int:
    """K+V of `tokens` at `bits` in groups of one head vector (head_dim 16 < 64), a scale and a shift per group;
    quanto packs the codes of 8 / bits groups into one byte row of head_dim bytes (the last row padded)."""
    codes = -(-tokens * heads // (8 // bits)) * head_dim
    return layers * 2 * (codes + tokens * heads * 2 * itemsize)


def test_hf_quant_methods_parse_with_one_line_for_other_widths():
    methods = parse_methods("full,hf-quant:4,hf-quant:2", None)
    assert [(m.kind, m.bits, m.spec) for m in methods[1:]] == [
        ("hf-quant", 4, "hf-quant:4"),
        ("hf-quant", 2, "hf-quant:2"),
    ]
    assert methods[1].budgets([16, 64]) == [None]
    with pytest.raises(ValueError, match="no layer settings"):
        methods[1].settings(None, {"num_layers": 3})
    for bad in ("hf-quant:8", "hf-quant:3", "hf-quant:16", "hf-quant:x", "hf-quant:"):
        with pytest.raises(InputError, match="hf-quant:4 or hf-quant:2") as exc:
            parse_methods(f"full,{bad}", None)
        assert "\n" not in str(exc.value)


def test_missing_backend_is_one_line_naming_the_extra(monkeypatch, tmp_path, tiny_hf_dir):
    from polykv_cli.main import app

    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # `import optimum.quanto` now raises ImportError
    require_backends(parse_methods("full,quant:4", None))  # no hf-quant method: nothing to check
    with pytest.raises(InputError, match=r"pip install 'polykv\[quant-anchor\]'"):
        require_backends(parse_methods("full,hf-quant:4", None))
    loaded = tiny_loaded()
    prompt = encode(loaded.tokenizer, "alpha beta", "key?")
    with pytest.raises(InputError, match="optimum-quanto"):
        hf_quantized.answer(loaded.model, loaded.tokenizer, prompt, 4, 4)
    line = {"id": "k", "task": "key", "context": "alpha beta", "question": "key ?", "answers": ["4"], "metric": "f1"}
    (tmp_path / "tasks.jsonl").write_text(json.dumps(line) + "\n")
    args = ["eval", "--model", str(tiny_hf_dir), "--tasks", str(tmp_path / "tasks.jsonl"), "--budgets", "16"]
    result = CliRunner().invoke(app, args + ["--methods", "full,hf-quant:4", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 2, result.output
    assert "pip install 'polykv[quant-anchor]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "ev" / "results.parquet").exists()


@needs_quanto
def test_cache_config_keeps_groups_within_a_head_vector():
    from conftest import tiny_llama

    cfg = tiny_llama().config
    assert hf_quantized.cache_config(cfg, 2) == {"backend": "quanto", "nbits": 2, "q_group_size": 16} | {
        "residual_length": 128
    }
    cfg.head_dim = 128
    assert hf_quantized.cache_config(cfg, 4)["q_group_size"] == 64  # transformers' default


@needs_quanto
def test_sliding_window_models_are_refused_in_one_line():
    loaded = tiny_loaded(arch="gemma3")
    prompt = encode(loaded.tokenizer, "alpha beta", "key?")
    with pytest.raises(InputError, match="full attention.*sliding_attention") as exc:
        hf_quantized.answer(loaded.model, loaded.tokenizer, prompt, 4, 4)
    assert "\n" not in str(exc.value)


@needs_quanto
@pytest.mark.parametrize("mode", ["query-aware", "context-only"])
def test_engine_measures_the_quantized_cache_of_the_prompt(mode):
    """kv_bytes is exactly the packed codes plus a scale and a shift per group, for the tokens the full cache
    holds before decoding (the whole prompt, or the context alone in context-only mode)."""
    loaded = tiny_loaded()
    inst = TaskInstance(
        "i", "t", "alpha beta gamma " * 20 + "the code is 712.", "What is the code?", ["712"], "substring", 6
    )
    res = evaluate_instance(loaded, inst, parse_methods("full,hf-quant:4,hf-quant:2", None), [16], mode=mode)
    got = {r["method"]: r for r in res.rows}
    full = got["full"]
    tokens = full["kv_bytes_full"] // (3 * 2 * 2 * 16 * 4)  # layers, K+V, KV heads, head dim, float32
    assert tokens < res.prompt_tokens if mode == "context-only" else tokens == res.prompt_tokens
    for bits in (4, 2):
        row = got[f"hf-quant:{bits}"]
        assert row["budget"] is None and row["kv_bytes_full"] == full["kv_bytes_full"]
        assert row["kv_bytes"] == _stored_bytes(tokens, 3, 2, 16, bits, 4)
    assert got["hf-quant:2"]["kv_bytes"] < got["hf-quant:4"]["kv_bytes"] < full["kv_bytes"]


@needs_quanto
def test_eval_cli_runs_hf_quant_equal_to_plain_generate(tmp_path, tiny_hf_dir):
    """`polykv eval` with hf-quant:4 on the tiny model: fewer bytes than full, and its answer is that of plain
    `generate(cache_implementation="quantized")` with the same cache configuration."""
    import pandas as pd

    from polykv.generation import decode_text, eos_ids
    from polykv.models import load_model
    from polykv_cli.main import app

    context = " ".join(["alpha beta gamma delta"] * 12 + ["The key is 4 2 .", "delta gamma"] * 3)
    line = {"id": "k", "task": "key", "context": context, "question": "What is the key ?", "answers": ["4 2"]}
    line |= {"metric": "substring", "max_new_tokens": 6}
    (tmp_path / "tasks.jsonl").write_text(json.dumps(line) + "\n")
    args = ["eval", "--model", str(tiny_hf_dir), "--tasks", str(tmp_path / "tasks.jsonl"), "--budgets", "16"]
    args += ["--methods", "full,quant:4,hf-quant:4", "--limit", "1", "--verify-prefill", "1"]
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "ev"), "--json"])
    assert result.exit_code == 0, result.output
    assert "3/3 identical predictions" in result.stderr
    rows = pd.read_parquet(tmp_path / "ev" / "results.parquet").set_index("method")
    assert len(rows) == 3
    hf, full = rows.loc["hf-quant:4"], rows.loc["full"]
    assert hf.kv_bytes < full.kv_bytes == hf.kv_bytes_full
    assert "hf-quant:4" in (tmp_path / "ev" / "report.md").read_text()

    loaded = load_model(str(tiny_hf_dir))
    model, tok = loaded.model, loaded.tokenizer
    ids = encode(tok, context, line["question"], max_tokens=4096).ids
    eos = sorted(eos_ids(tok, model))
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            cache_implementation="quantized",
            cache_config=hf_quantized.cache_config(model.config, 4),
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    assert out.shape[1] > ids.shape[1]
    assert hf.prediction == decode_text(tok, out[:, ids.shape[1] :], set(eos))[0]
