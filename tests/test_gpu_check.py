"""scripts/gpu_check.py (`make gpu-check`): its exit without a GPU, and its pure helpers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import cli_env

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)
Check = gpu_check.Check


def test_without_a_gpu_exits_2_with_one_line():
    env = cli_env(CUDA_VISIBLE_DEVICES="")  # no GPU even on a machine that has one
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [gpu_check.NO_GPU]


def test_summary_is_one_table_with_escaped_details():
    checks = [Check("a", "pass", "3 passed"), Check("b", "fail", "x | y\nz"), Check("c", "skip", "no bf16")]
    text = gpu_check.summary(checks)
    assert text.splitlines()[:5] == [
        "| check | status | detail |",
        "| --- | --- | --- |",
        "| a | PASS | 3 passed |",
        "| b | FAIL | x \\| y z |",
        "| c | SKIP | no bf16 |",
    ]
    assert text.endswith("1 passed, 1 failed, 1 skipped")


def test_exit_status_is_zero_only_when_all_pass():
    assert gpu_check.exit_status([Check("a", "pass", ""), Check("b", "pass", "")]) == 0
    assert gpu_check.exit_status([Check("a", "pass", ""), Check("b", "skip", "")]) == 1
    assert gpu_check.exit_status([Check("a", "fail", "")]) == 1
    assert gpu_check.exit_status([]) == 1


def test_pytest_check_reads_the_summary_line():
    ok = gpu_check.pytest_check("t", 0, "....\n12 passed, 40 deselected in 3.10s\n")
    assert ok == Check("t", "pass", "12 passed")
    out = "F.\nFAILED tests/test_kernels.py::test_x - AssertionError\n1 failed, 1 passed in 2.00s"
    failed = gpu_check.pytest_check("t", 1, out)
    assert failed.status == "fail" and "1 failed" in failed.detail and "test_x" in failed.detail
    out = "s\nSKIPPED [1] tests/test_kernels.py:283: bf16 needs CUDA\n1 skipped, 53 deselected in 1.00s"
    assert gpu_check.pytest_check("t", 0, out) == Check("t", "skip", "1 skipped; bf16 needs CUDA")
    assert gpu_check.pytest_check("t", 5, "54 deselected in 1.00s").status == "fail"
    assert gpu_check.pytest_check("t", 2, "ERROR tests/x.py\n1 error in 1.00s").status == "fail"


def run_json(text: str, kv: int, decode: str) -> dict:
    return {
        "text": text,
        "kv_bytes": kv,
        "kv_bytes_full": 4 * kv,
        "kernels": {"prefill": "torch sdpa", "score": "torch", "decode": decode},
        "prompt_tokens": 2000,
        "decode_s": 0.1,
    }


def test_compare_runs_needs_same_answer_bytes_and_both_backends():
    torch_run = run_json("7341", 100, "torch")
    good = gpu_check.compare_runs(run_json("7341", 100, "triton"), torch_run)
    assert good.status == "pass" and "'7341'" in good.detail and "25.0% of full" in good.detail
    for triton_run in (run_json("7340", 100, "triton"), run_json("7341", 99, "triton"), run_json("7341", 100, "torch")):
        assert gpu_check.compare_runs(triton_run, torch_run).status == "fail"


def test_contexts_are_cut_to_the_model_window():
    assert gpu_check.contexts(None, 64) == [("2k", 2048, ""), ("8k", 8192, "")]
    assert gpu_check.contexts(32768, 64) == [("2k", 2048, ""), ("8k", 8192, "")]
    short, long = gpu_check.contexts(8192, 64)
    assert short == ("2k", 2048, "") and long[:2] == ("8k", 8128)
    assert long[2] == "; 8k cut to 8128: the model's context is 8192, +64 decoded"
