"""Evaluation task files and their metrics.

A task file is JSONL, one instance per line (the format outside users bring their own tasks in):

    {"id": str, "task": str, "context": str, "question": str, "answers": [str, ...],
     "metric": "substring" | "exact" | "f1" | "edit_sim", "max_new_tokens": int (optional)}

Metrics follow LongBench so that numbers are comparable in spirit; each returns the best match over the answers,
and `score` reports it on a 0-100 scale:

- substring: 1 if any answer occurs in the prediction, ignoring case.
- exact: 1 if the normalised prediction equals a normalised answer (normalised = lowercase, punctuation removed,
  articles a/an/the removed, whitespace collapsed, as LongBench's `normalize_answer`).
- f1: LongBench's token F1 over the normalised token multisets.
- edit_sim: 1 - Levenshtein(line, answer) / max(len(line), len(answer)), where `line` is the prediction's first
  non-empty line that is not a Markdown code fence, both sides stripped (LongBench's code tasks compare the first
  code line; chat models often open with a fence or indent differently, which says nothing about the code).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from polykv.errors import TaskError

METRICS = ("substring", "exact", "f1", "edit_sim")


@dataclass(frozen=True)
class TaskInstance:
    """One evaluation item: prompt parts, reference answers, how to score and how much to generate."""

    id: str
    task: str
    context: str
    question: str
    answers: list[str]
    metric: str
    max_new_tokens: int | None = None


# --------------------------------------------------------------------------------------------------------------
# Metrics (each returns a value in [0, 1], the maximum over the reference answers)

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """LongBench/SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def substring_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any (stripped, non-empty) answer occurs in the prediction, case-insensitively."""
    pred = prediction.lower()
    return float(any(a.strip() and a.strip().lower() in pred for a in answers))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _token_f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 between normalised prediction and answer (LongBench's qa_f1_score), best over answers."""
    pred = normalize_answer(prediction).split()
    return max((_token_f1(pred, normalize_answer(a).split()) for a in answers), default=0.0)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def first_code_line(prediction: str) -> str:
    """The first non-empty line that is not a Markdown fence (```...), stripped; '' if there is none."""
    for line in prediction.splitlines():
        s = line.strip()
        if s and not s.startswith("```"):
            return s
    return ""


def edit_similarity(prediction: str, answers: Sequence[str]) -> float:
    """1 - normalised Levenshtein distance between the first code line and an answer (stripped), best over answers."""
    line = first_code_line(prediction)
    best = 0.0
    for a in answers:
        ref = a.strip()
        longest = max(len(line), len(ref))
        best = max(best, 1.0 if longest == 0 else 1.0 - levenshtein(line, ref) / longest)
    return best


METRIC_FUNCTIONS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "substring": substring_match,
    "exact": exact_match,
    "f1": f1_score,
    "edit_sim": edit_similarity,
}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """The instance's score on a 0-100 scale; TaskError for an unknown metric or no answers."""
    fn = METRIC_FUNCTIONS.get(metric)
    if fn is None:
        raise TaskError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not answers:
        raise TaskError("an instance has no reference answers; give each instance a non-empty 'answers' list")
    return 100.0 * fn(prediction, answers)


# --------------------------------------------------------------------------------------------------------------
# Loading


def _check(obj: object) -> str | None:
    """What is wrong with one parsed line, or None if it is a valid instance."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key in ("id", "task"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            return f"'{key}' must be a non-empty string" if key in obj else f"missing '{key}'"
    for key in ("context", "question"):
        if key not in obj:
            return f"missing '{key}'"
        if not isinstance(obj[key], str):
            return f"'{key}' must be a string, got {type(obj[key]).__name__}"
    if not (obj["context"].strip() or obj["question"].strip()):
        return "'context' and 'question' are both empty"
    answers = obj.get("answers")
    if "answers" not in obj:
        return "missing 'answers'"
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        return "'answers' must be a non-empty list of non-empty strings"
    if obj.get("metric") not in METRICS:
        return f"'metric' must be one of {', '.join(METRICS)}, got {obj.get('metric')!r}"
    mnt = obj.get("max_new_tokens")
    if mnt is not None and (not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1):
        return f"'max_new_tokens' must be a positive integer, got {mnt!r}"
    return None


def load_tasks(path: str | Path) -> tuple[list[TaskInstance], list[str]]:
    """Parse a task JSONL file into (instances, warnings); malformed lines are skipped with a warning naming them.

    Blank lines are ignored and unknown keys are allowed (forward compatibility). A line whose id repeats an
    earlier one is skipped. Raises TaskError if the file is missing/unreadable or holds no valid instance.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"task file {p} does not exist; pass an existing JSONL task file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"cannot read task file {p} ({exc}); pass a readable UTF-8 JSONL file") from None
    instances: list[TaskInstance] = []
    warnings: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            warnings.append(f"{p}:{lineno}: skipped, not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        problem = _check(obj)
        if problem is None and obj["id"] in seen:
            problem = f"duplicate id {obj['id']!r} (first on line {seen[obj['id']]})"
        if problem is not None:
            warnings.append(f"{p}:{lineno}: skipped, {problem}")
            continue
        seen[obj["id"]] = lineno
        instances.append(
            TaskInstance(
                id=obj["id"],
                task=obj["task"],
                context=obj["context"],
                question=obj["question"],
                answers=list(obj["answers"]),
                metric=obj["metric"],
                max_new_tokens=obj.get("max_new_tokens"),
            )
        )
    if not instances:
        detail = f" ({len(warnings)} malformed lines, first: {warnings[0]})" if warnings else " (the file is empty)"
        raise TaskError(f"task file {p} has no valid task instance{detail}; fix the lines as the task format says")
    return instances, warnings
