"""Calibration samples: PolyKV's JSONL schema, LongBench-format rows, and a stable hash of a sample list.

Our JSONL schema is one object per line with `id`, `category`, `context`, `question` (strings) and `answers`
(a non-empty list of strings; calibration teacher-forces `answers[0]`). Other keys are ignored. Every problem is
raised as a DataError whose one-line message names the file, the line and the fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from polykv.canonical import canonical_json
from polykv.errors import DataError

FIELDS = ("id", "category", "context", "question", "answers")
_FIX = "each line must be a JSON object with string id, category, context, question and a list of string answers"


@dataclass(frozen=True)
class Sample:
    """One calibration (or LongBench) item: the prompt's context and question, and its reference answers."""

    id: str
    category: str
    context: str
    question: str
    answers: list[str]


def _field_problem(obj: dict) -> str | None:
    for key in FIELDS:
        if key not in obj:
            return f"missing field '{key}'"
    for key in ("id", "category", "context", "question"):
        if not isinstance(obj[key], str):
            return f"field '{key}' must be a string, got {type(obj[key]).__name__}"
    if not obj["id"].strip():
        return "field 'id' is empty"
    answers = obj["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        return "field 'answers' must be a list of strings"
    if not answers or not answers[0].strip():
        return "field 'answers' must hold at least one non-empty answer"
    return None


def load_samples(path: str | Path) -> list[Sample]:
    """Read our JSONL schema (blank lines allowed); DataError on a missing/empty file or any bad line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {p} does not exist; pass --data with an existing JSONL file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {p} ({exc}); pass --data with a readable UTF-8 JSONL file") from None
    samples: list[Sample] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); {_FIX}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}; {_FIX}")
        problem = _field_problem(obj)
        if problem:
            raise DataError(f"{p}:{lineno}: {problem}; {_FIX}")
        if obj["id"] in first_line:
            raise DataError(
                f"{p}:{lineno}: duplicate id {obj['id']!r} (first on line {first_line[obj['id']]}); make ids unique"
            )
        first_line[obj["id"]] = lineno
        samples.append(Sample(obj["id"], obj["category"], obj["context"], obj["question"], list(obj["answers"])))
    if not samples:
        raise DataError(f"data file {p} is empty; pass --data with a JSONL file holding at least one sample")
    return samples


def from_longbench_rows(rows: Iterable[dict], name: str) -> list[Sample]:
    """Convert LongBench rows (`input`, `context`, `answers`, `dataset`, `_id`, ...) into Samples.

    The category is the row's `dataset` field, else `name`; the id is `_id`, else NAME-INDEX. Answers that are a
    single string are wrapped in a list and non-string answers are converted with str().
    """
    samples: list[Sample] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        for key in ("input", "context", "answers"):
            if key not in row:
                raise DataError(
                    f"{name} row {i}: missing LongBench field '{key}'; pass data in LongBench format "
                    "(input, context, answers, dataset, _id) or our JSONL schema"
                )
        answers = row["answers"]
        answers = [answers] if isinstance(answers, str) else [str(a) for a in (answers or [])]
        if not answers:
            raise DataError(f"{name} row {i}: empty 'answers'; every LongBench row needs at least one answer")
        sid = str(row.get("_id") or f"{name}-{i}")
        if sid in seen:
            raise DataError(f"{name} row {i}: duplicate _id {sid!r}; LongBench rows need unique _id values")
        seen.add(sid)
        category = str(row.get("dataset") or name)
        samples.append(Sample(sid, category, str(row["context"] or ""), str(row["input"] or ""), answers))
    return samples


def _unreachable(exc: BaseException) -> bool:
    """Heuristic: does this exception (or its causes) mean the hub could not be contacted?"""
    words = (
        "connection",
        "offline",
        "couldn't reach",
        "could not reach",
        "timed out",
        "timeout",
        "name resolution",
        "network",
        "localentrynotfound",
        "max retries",
        "temporary failure",
    )
    while exc is not None:
        text = f"{type(exc).__name__} {exc}".lower()
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(w in text for w in words):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_hf_dataset(spec: str, split: str = "test", limit: int | None = None) -> list[Sample]:
    """Load LongBench-format data from the Hugging Face hub ("NAME[:CONFIG]") or a local .jsonl/.json file.

    A local path is read with the datasets "json" builder (its only split is "train", so `split` is ignored).
    `limit` keeps the first rows. DataError if the hub is unreachable or the data cannot be loaded or converted.
    """
    import datasets

    path = Path(spec).expanduser()
    local = path.suffix in (".jsonl", ".json")
    if local and not path.is_file():
        raise DataError(f"data file {path} does not exist; pass an existing LongBench-format .jsonl/.json file")
    name, _, config = spec.partition(":")
    try:
        if local:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
            name = path.stem
        else:
            ds = datasets.load_dataset(name, config or None, split=split)
            name = config or name.rsplit("/", 1)[-1]
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types; all of them mean "cannot load"
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        if not local and _unreachable(exc):
            raise DataError(
                f"cannot load {spec}: the Hugging Face hub is not reachable ({first}); "
                "pass --data with a local JSONL file instead"
            ) from exc
        raise DataError(
            f"cannot load {spec} ({type(exc).__name__}: {first}); check the name, config and split, "
            "or pass --data with a local JSONL file"
        ) from exc
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return from_longbench_rows(iter(ds), name)


def data_hash(samples: Iterable[Sample]) -> str:
    """First 16 hex digits of the sha256 of the samples as RFC 8785 canonical JSON, UTF-8 (order-sensitive).

    For samples (strings only) this is byte for byte the sorted, unescaped `json.dumps` text hashed before, so
    stored data hashes keep matching.
    """
    payload = canonical_json([asdict(s) for s in samples])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
