"""`polykv eval --workers N`: worker processes give the same rows as one process, in instance order, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from polykv.evaluate.methods import parse_methods
from polykv.evaluate.tasks import TaskInstance
from polykv.evaluate.workers import EvalJob, run_instances, worker_device

PASSKEY = (Path(__file__).parents[1] / "examples" / "passkey.txt").read_text()
WORDS = ["pineapple", "lighthouse", "marmalade"]


def _instances() -> list[TaskInstance]:
    # shorter and shorter, so the longest-first queue finishes them out of order
    return [
        TaskInstance(
            f"p{k}",
            "passkey",
            PASSKEY[1500 * k :].replace("pineapple", w),
            "What is the passkey for the archive? Answer with the passkey only.",
            [w],
            "substring",
            12,
        )
        for k, w in enumerate(WORDS)
    ]


@pytest.mark.bundled
def test_two_workers_give_the_rows_of_one_process(smollm2):
    job = EvalJob("smollm2-135m", tuple(parse_methods("full,uniform:snapkv,uniform:h2o", None)), (32, 128))
    instances = _instances()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # the workers' thread count: the same reductions, the same tokens
    try:
        serial = [f.result for f in run_instances(job, instances, loaded=smollm2)]
    finally:
        torch.set_num_threads(threads)
    parallel = list(run_instances(job, instances, verify={("passkey", "p1")}, workers=2))
    assert sorted(f.result.instance.id for f in parallel) == ["p0", "p1", "p2"]
    by_id = {f.result.instance.id: f for f in parallel}
    for res in serial:
        assert by_id[res.instance.id].result.rows == res.rows
    check = by_id["p1"].check  # the prefill-per-method check ran inside a worker
    assert check is not None and check["same_predictions"] == check["configurations"] == 5
    assert by_id["p0"].check is None and by_id["p2"].check is None


def test_workers_spread_over_gpus_only_when_no_device_is_named():
    assert [worker_device(None, k, 4) for k in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    assert worker_device("cuda", 5, 2) == "cuda:1"
    assert worker_device("cuda:3", 1, 4) == "cuda:3" and worker_device("cpu", 1, 4) == "cpu"
    assert worker_device(None, 1, 1) is None and worker_device(None, 1, 0) is None


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        list(run_instances(EvalJob("smollm2-135m", (), (32,)), _instances(), workers=0))


@pytest.mark.bundled
def test_eval_cli_with_workers_writes_rows_in_instance_order(tmp_path):
    from polykv_cli.main import app

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(i.__dict__) + "\n" for i in _instances()))
    args = [
        "eval",
        "--tasks",
        str(tasks),
        "--budgets",
        "32",
        "--methods",
        "full,uniform:streaming",
        "--out",
        str(tmp_path / "ev"),
        "--workers",
        "2",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(tmp_path / "ev" / "results.parquet")
    assert list(rows.instance_id) == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert rows[rows.method == "full"].score.tolist() == [100.0, 100.0, 100.0]
    info = json.loads((tmp_path / "ev" / "info.json").read_text())
    assert info["workers"] == 2 and "workers: 2" in (tmp_path / "ev" / "report.md").read_text()
    bad = CliRunner().invoke(app, args[:-3] + ["--workers", "0"])
    assert bad.exit_code == 2 and "--workers 0 must be at least 1" in bad.output
