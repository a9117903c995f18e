"""The shipped evaluation suite: one JSONL task file per task in `data/` (8 tasks x 30 instances), built by `build.py`.

In the spirit of LongBench and RULER, with contexts of ~9-11.5k characters (~2.5k-3.3k tokens at chars / 3.5):

| task                   | context                                             | answer (metric)                      |
|------------------------|-----------------------------------------------------|--------------------------------------|
| passkey                | real prose, one "The passkey for NAME is N." needle | 5-digit number (substring)           |
| multikey_needles       | real prose, 8 key-value needles                     | one key's 7-digit number (substring) |
| variable_tracking      | real prose, 3 chains of 1-2 "same as" links         | number at a chain's end (substring)  |
| frequent_words         | ~1400 words, one at 15%, two at 5%                  | the most frequent word (substring)   |
| changelog_qa           | a real Debian changelog (source packages n-z)       | a signer or a version (f1)           |
| multidoc_retrieval     | 15-20 titled stdlib docstrings (modules n-z)        | title of the quoted one (substring)  |
| code_completion        | real stdlib source (modules n-z)                    | the next line (edit_sim)             |
| fewshot_classification | ~190 "Line: code / Kind: label" examples, 8 labels  | the query line's label (substring)   |

Needles, chain links, quoted documents and few-shot examples are spread over the whole context (stratified
depths), so heavy compression that keeps only the start and end should lose them. The suite is disjoint from
`calibration_data/` (see `sources.py`). Rebuild with `python -m polykv.evaluate.suite.build --out DIR`.
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
        raise TaskError(
            f"no task files in {default_suite_path()}; reinstall polykv or rebuild the suite with "
            "python -m polykv.evaluate.suite.build --out src/polykv/evaluate/suite/data"
        )
    out: list[TaskInstance] = []
    for f in files:
        instances, warnings = load_tasks(f)
        if warnings:
            raise TaskError(f"the shipped suite file is malformed ({warnings[0]}); rebuild the suite")
        out.extend(instances)
    return out
