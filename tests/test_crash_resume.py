"""kill -9 of real `polykv calibrate` subprocesses at several points, then the same command again: it resumes and
the final directory equals an uninterrupted run (same files, same run.json, same metadata but timings,
byte-identical Parquet parts). Kill points are named by the `POLYKV_TEST_KILL_AT` hook (`polykv.io.maybe_crash`).

One output directory goes through every kill point in turn (each run resumes what the previous kill left and is
killed further on), which keeps the number of subprocesses low.
"""

from __future__ import annotations

import json
import signal

import pandas as pd
import pytest
from conftest import assert_same_calibration, calibrate_cli, cli_env

pytestmark = pytest.mark.slow


def parts(out, sub: str) -> list[str]:
    return sorted(p.name for p in (out / sub).glob("part-*.parquet"))


def temps(out) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob(".*.tmp"))


def test_killed_at_each_point_then_resumed_equals_uninterrupted(
    tiny_hf_dir, tiny_data, reference_calibration, tmp_path
):
    out = tmp_path / "cal"

    def killed_at(point: str) -> None:
        result = calibrate_cli(tiny_hf_dir, tiny_data, out, env=cli_env(POLYKV_TEST_KILL_AT=point))
        assert result.returncode == -signal.SIGKILL, f"not killed at {point}: {result.stderr[-2000:]}"
        assert not (out / "metadata.json").exists()

    # 1. right after sample 0's last part: sample 0 is done, nothing of sample 1 exists
    killed_at("after-sample:0")
    assert parts(out, "curves") == parts(out, "statistics") == ["part-00000.parquet"]
    done = (out / "curves" / "part-00000.parquet").read_bytes()

    # 2. between sample 1's two parts: its statistics part exists, its curves part (the "done" mark) does not
    killed_at("between-parts:1")
    assert parts(out, "statistics") == ["part-00000.parquet", "part-00001.parquet"]
    assert parts(out, "curves") == ["part-00000.parquet"]
    assert (out / "curves" / "part-00000.parquet").read_bytes() == done  # not redone

    # 3. during a Parquet write: the temp file of sample 1's curves part is complete but not yet renamed
    killed_at("before-rename:curves/part-00001.parquet")
    assert parts(out, "curves") == ["part-00000.parquet"]
    assert [t.split("/")[0] for t in temps(out)] == ["curves"]
    pd.read_parquet(out / "curves")  # a reader ignores the temp file

    # 4. every part written, metadata.json (the "complete" mark) not yet renamed into place
    killed_at("before-rename:cal/metadata.json")
    assert parts(out, "curves") == parts(out, "statistics") == [f"part-{i:05d}.parquet" for i in range(3)]
    assert temps(out) and all("/" not in t for t in temps(out))  # only metadata's temp file, stale ones removed

    # 5. the same command, uninterrupted: it finishes, removes the last temp file and matches a clean run
    result = calibrate_cli(tiny_hf_dir, tiny_data, out)
    assert result.returncode == 0, result.stderr
    assert temps(out) == []
    assert_same_calibration(out, reference_calibration)
    assert json.loads((out / "metadata.json").read_text())["timings"]["per_sample"] == {}  # nothing was redone
