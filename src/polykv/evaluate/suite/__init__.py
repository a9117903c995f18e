"""The shipped evaluation suite: one JSONL task file per task in `data/`, built by `build.py`.

Eight tasks x 30 instances in the spirit of LongBench and RULER (retrieval, multi-hop tracking, aggregation,
single- and multi-document QA, code completion, few-shot classification), with contexts of ~9-12k characters.
Regenerate with `python -m polykv.evaluate.suite.build --out src/polykv/evaluate/suite/data`.
"""

from __future__ import annotations

from pathlib import Path

from polykv.errors import TaskError
from polykv.evaluate.tasks import TaskInstance, load_tasks


def default_suite_path() -> Path:
    """The directory holding the shipped `<task>.jsonl` files (inside the installed package)."""
    return Path(__file__).resolve().parent / "data"


def suite_files(path: Path | None = None) -> list[Path]:
    """The task files of a suite directory, sorted by name."""
    return sorted((path or default_suite_path()).glob("*.jsonl"))


def load_default_suite() -> list[TaskInstance]:
    """Every instance of the shipped suite, task files in name order; TaskError if a file is malformed or absent."""
    files = suite_files()
    if not files:
        raise TaskError(f"no task files in {default_suite_path()}; reinstall polykv or rebuild the suite with "
                        "python -m polykv.evaluate.suite.build --out src/polykv/evaluate/suite/data")
    out: list[TaskInstance] = []
    for f in files:
        instances, warnings = load_tasks(f)
        if warnings:
            raise TaskError(f"the shipped suite file is malformed ({warnings[0]}); rebuild the suite")
        out.extend(instances)
    return out
