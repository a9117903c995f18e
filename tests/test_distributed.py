"""Scale-out: `torchrun --nproc-per-node 2 -m polykv_cli calibrate ...` on CPU (gloo) with the tiny model.

The ranks split the samples and write their own parts, rank 0 writes run.json before any other rank starts and
metadata.json after all are done; the merged directory equals a single-process run up to float tolerance. Rank 0's
set-up errors (here: --out holds another calibration) stop every rank with the same one-line error, before any
rank writes a part.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import CAL_ARGS, assert_same_calibration, cli_env

pytestmark = pytest.mark.slow


def torchrun_calibrate(model_dir, data, out, *more):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
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
    return subprocess.run(cmd, env=cli_env(GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True, timeout=600)


@pytest.fixture
def foreign_dir(reference_calibration, tmp_path):
    """A directory holding another calibration (other budgets) with a part the new run must not keep."""
    out = tmp_path / "cal"
    (out / "curves").mkdir(parents=True)
    run_info = json.loads((reference_calibration / "run.json").read_text())
    run_info["settings"]["budgets"] = [8, 16]
    (out / "run.json").write_text(json.dumps(run_info))
    shutil.copy(reference_calibration / "curves" / "part-00000.parquet", out / "curves" / "part-00007.parquet")
    return out


def test_other_calibration_in_out_stops_every_rank(tiny_hf_dir, tiny_data, foreign_dir):
    before = sorted(p.relative_to(foreign_dir) for p in foreign_dir.rglob("*"))
    result = torchrun_calibrate(tiny_hf_dir, tiny_data, foreign_dir)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr[-3000:]  # one line per rank, the same one
    assert all("other settings (budgets differ)" in e and "--overwrite" in e for e in errors), errors
    assert sorted(p.relative_to(foreign_dir) for p in foreign_dir.rglob("*")) == before  # no rank wrote anything


def test_two_ranks_merge_to_the_single_process_result(tiny_hf_dir, tiny_data, foreign_dir, reference_calibration):
    result = torchrun_calibrate(tiny_hf_dir, tiny_data, foreign_dir, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_calibration(foreign_dir, reference_calibration, exact=False)
    meta = json.loads((foreign_dir / "metadata.json").read_text())
    assert sorted(meta["timings"]["per_sample"]) == ["s0", "s1", "s2"]  # gathered from both ranks
