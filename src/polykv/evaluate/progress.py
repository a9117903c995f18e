"""Checkpointing an evaluation: after every instance its rows are saved, so a killed run resumes where it stopped.

`progress.json` records the run's key (model, methods, budgets, mode, max context, instance ids) and
`results.partial.parquet` the rows so far, both written atomically. A run started with the same key skips the
instances already done; a different key is refused (nothing is overwritten). A finished run removes both files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from polykv.errors import InputError
from polykv.io import atomic_write, atomic_write_json

PROGRESS = "progress.json"
PARTIAL = "results.partial.parquet"


def load_progress(out_dir: Path, key: dict) -> tuple[list[dict], set[tuple[str, str]]]:
    """Rows and (task, instance id) pairs already evaluated for this run key (none if there is no checkpoint)."""
    path = out_dir / PROGRESS
    if not path.exists():
        return [], set()
    try:
        saved = json.loads(path.read_text())
        rows = pd.read_parquet(out_dir / PARTIAL).to_dict("records")
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{out_dir} holds an unreadable evaluation checkpoint ({exc}); delete {path} and "
            f"{out_dir / PARTIAL} to start again"
        ) from exc
    if saved.get("key") != key:
        changed = sorted(k for k in key if saved.get("key", {}).get(k) != key[k])
        raise InputError(
            f"{out_dir} holds an unfinished evaluation with other settings ({', '.join(changed)} "
            f"differ); resume it with the same options, or choose another --out"
        )
    return rows, {(str(r["task"]), str(r["instance_id"])) for r in rows}


def save_progress(out_dir: Path, key: dict, rows: list[dict]) -> None:
    atomic_write(out_dir / PARTIAL, lambda tmp: pd.DataFrame(rows).to_parquet(tmp, index=False))
    atomic_write_json(out_dir / PROGRESS, {"key": key})


def clear_progress(out_dir: Path) -> None:
    for name in (PARTIAL, PROGRESS):
        (out_dir / name).unlink(missing_ok=True)
