"""Task files and metrics: hand-computed metric values, malformed-line handling, and the shipped suite."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from polykv.errors import TaskError
from polykv.evaluate.suite import build, default_suite_path, load_default_suite, suite_files
from polykv.evaluate.suite.sources import DOC_DIR, LICENSE_DIR
from polykv.evaluate.tasks import (
    METRICS,
    edit_similarity,
    exact_match,
    f1_score,
    first_code_line,
    levenshtein,
    load_tasks,
    normalize_answer,
    score,
    substring_match,
)

# --------------------------------------------------------------------------------------------------- metrics


def test_substring_is_case_insensitive_and_any_answer():
    assert score("substring", "The passkey for ALICE is 12345.", ["12345"]) == 100.0
    assert score("substring", "it is ALICE", ["alice"]) == 100.0
    assert score("substring", "alice", ["ALICE"]) == 100.0
    assert score("substring", "bob", ["alice", "Bob"]) == 100.0
    assert score("substring", "1234", ["12345"]) == 0.0
    assert substring_match("anything", ["  "]) == 0.0  # a blank answer never matches


def test_exact_match_normalises():
    assert normalize_answer("  The  Answer, is: 42! ") == "answer is 42"
    assert score("exact", "The Answer!", ["answer"]) == 100.0
    assert score("exact", "an apple", ["Apple."]) == 100.0
    assert score("exact", "apples", ["apple"]) == 0.0
    assert score("exact", "the answer is 42", ["42"]) == 0.0  # exact, not containment
    assert exact_match("Paris", ["London", "paris"]) == 1.0


def test_f1_hand_computed():
    # pred {dominic, hargreaves, signed, it} vs ref {dominic, hargreaves}: P = 2/4, R = 1 -> F1 = 2/3
    assert score("f1", "Dominic Hargreaves signed it", ["Dominic Hargreaves"]) == pytest.approx(200 / 3)
    # articles dropped: "cat sat on mat" vs "cat on mat": P = 3/4, R = 1 -> F1 = 6/7
    assert score("f1", "the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(600 / 7)
    # multisets: {red: 2, blue: 1} & {red: 1, blue: 2} = 2 common -> P = R = 2/3 -> F1 = 2/3
    assert f1_score("red red blue", ["red blue blue"]) == pytest.approx(2 / 3)
    # best over answers: "paris" vs "paris france": P = 1, R = 1/2 -> F1 = 2/3
    assert f1_score("Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    # punctuation removed inside tokens: "1.48.4+ds1-1" -> "14844ds11"
    assert f1_score("version 1.48.4+ds1-1", ["1.48.4+ds1-1"]) == pytest.approx(2 / 3)
    assert f1_score("nothing shared", ["other words"]) == 0.0
    assert f1_score("", ["x"]) == 0.0


def test_levenshtein_hand_computed():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("intention", "execution") == 5
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3
    assert levenshtein("same", "same") == 0


def test_edit_similarity_hand_computed():
    assert edit_similarity("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)
    # first non-fence line "return x + 1" (12 chars) vs "return x+1": 2 deletions -> 1 - 2/12
    assert score("edit_sim", "```python\n    return x + 1\n```", ["return x+1"]) == pytest.approx(100 * (1 - 2 / 12))
    assert score("edit_sim", "\n\nfoo = bar()\nmore lines", ["  foo = bar()  "]) == 100.0
    assert score("edit_sim", "", ["abc"]) == 0.0
    assert edit_similarity("abcd", ["xxxx", "abce"]) == pytest.approx(0.75)  # best answer: 1 - 1/4
    assert first_code_line("```\n```py\n\n  x = 1  \ny") == "x = 1"


def test_score_rejects_unknown_metric_and_missing_answers():
    with pytest.raises(TaskError, match="unknown metric"):
        score("bleu", "x", ["x"])
    with pytest.raises(TaskError, match="no reference answers"):
        score("exact", "x", [])
    assert set(METRICS) == {"substring", "exact", "f1", "edit_sim"}


# --------------------------------------------------------------------------------------------------- loading


def _line(**overrides) -> str:
    row = {"id": "a", "task": "t", "context": "ctx", "question": "q?", "answers": ["x"], "metric": "exact"}
    row.update(overrides)
    return json.dumps({k: v for k, v in row.items() if v is not ...})


def test_load_tasks_skips_malformed_lines_with_their_numbers(tmp_path: Path):
    lines = [
        _line(id="a", max_new_tokens=8, extra="ignored"),  # 1 ok
        "{not json",  # 2
        _line(id="b", answers=...),  # 3 missing answers
        _line(id="c", metric="bleu"),  # 4 unknown metric
        "",  # 5 blank: ignored
        _line(id="d", max_new_tokens=0),  # 6
        _line(id="a"),  # 7 duplicate id
        _line(id="e"),  # 8 ok
        "[1, 2]",  # 9 not an object
        _line(id="f", answers=[]),  # 10
        _line(id="g", context=3),  # 11
        _line(id="h", max_new_tokens=True),  # 12
        _line(id="", task="t"),  # 13
    ]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(lines) + "\n")
    instances, warnings = load_tasks(f)
    assert [x.id for x in instances] == ["a", "e"]
    assert instances[0].max_new_tokens == 8 and instances[1].max_new_tokens is None
    assert instances[0].answers == ["x"] and instances[0].metric == "exact"
    numbers = [int(re.search(r":(\d+): skipped", w).group(1)) for w in warnings]
    assert numbers == [2, 3, 4, 6, 7, 9, 10, 11, 12, 13]
    text = "\n".join(warnings)
    for needle in (
        "not valid JSON",
        "missing 'answers'",
        "'metric' must be one of",
        "'max_new_tokens' must be",
        "duplicate id 'a' (first on line 1)",
        "expected a JSON object",
        "non-empty list",
        "'context' must be a string",
        "'id' must be a non-empty string",
    ):
        assert needle in text
    assert all("\n" not in w for w in warnings)


def test_load_tasks_errors(tmp_path: Path):
    with pytest.raises(TaskError, match="does not exist"):
        load_tasks(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TaskError, match="no valid task instance.*empty"):
        load_tasks(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(TaskError, match=r"no valid task instance \(1 malformed lines, first: .*bad.jsonl:1:"):
        load_tasks(bad)


# --------------------------------------------------------------------------------------------------- shipped suite


@pytest.fixture(scope="module")
def suite():
    return load_default_suite()


def test_shipped_suite_shape(suite):
    files = suite_files()
    assert files and all(f.parent == default_suite_path() for f in files)
    for f in files:
        instances, warnings = load_tasks(f)
        assert warnings == [], warnings[:3]
        assert {x.task for x in instances} == {f.stem}
    counts = Counter(x.task for x in suite)
    assert len(counts) >= 6
    assert min(counts.values()) >= 30
    assert len({x.id for x in suite}) == len(suite)
    for x in suite:
        assert x.metric in METRICS
        assert x.answers and all(a.strip() for a in x.answers)
        assert x.max_new_tokens is not None and 8 <= x.max_new_tokens <= 32
        assert 2000 <= len(x.context) / 3.5 <= 4000, (x.id, len(x.context))
        assert max(len(a) for a in x.answers) <= 100


def test_shipped_suite_answers_are_in_the_context(suite):
    for x in suite:
        if x.metric != "edit_sim":
            assert any(a in x.context for a in x.answers), x.id
        assert not any(a.lower() in x.question.lower() for a in x.answers), x.id


def test_shipped_suite_generated_answers_are_right(suite):
    for x in suite:
        if x.task == "frequent_words":
            counts = Counter(x.context.split("\n")).most_common(2)
            assert counts[0][0] == x.answers[0] and counts[0][1] > counts[1][1], x.id
        elif x.task == "multikey_needles":
            key = re.search(r"number for (\S+)\?", x.question).group(1)
            assert re.findall(rf"The special magic number for {re.escape(key)} is (\d+)\.", x.context) == x.answers
        elif x.task == "variable_tracking":
            env: dict[str, str] = {}
            statement = r"The value of variable (\w+) is (?:the same as the value of variable )?(\w+)\."
            for name, value in re.findall(statement, x.context):
                env[name] = env.get(value, value)
            asked = re.search(r"value of variable (\w+)\?", x.question).group(1)
            assert env[asked] == x.answers[0], x.id
        elif x.task == "passkey":
            assert x.context.count(f"is {x.answers[0]}.") == 1


#: the builders read Debian's license texts and changelogs; a machine without them cannot rebuild the suite
needs_sources = pytest.mark.skipif(
    not LICENSE_DIR.is_dir() or not any(DOC_DIR.glob("*/changelog.Debian.gz")),
    reason="no Debian license texts or changelogs on this machine (the builders need them)",
)


@needs_sources
def test_builders_are_deterministic_and_valid(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    build.build_suite(a, n=2)
    build.build_suite(b, n=2)
    for name in build.TASKS:
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes()
        instances, warnings = load_tasks(a / f"{name}.jsonl")
        assert len(instances) == 2 and not warnings


@needs_sources
def test_development_split_uses_the_calibration_sources(tmp_path: Path):
    """`--partition calibration` draws the same tasks from other texts: no context shares a source passage."""
    dev, test = tmp_path / "dev", tmp_path / "test"
    assert (
        build.main(
            ["--out", str(dev), "--n", "2", "--partition", "calibration", "--tasks", "passkey", "code_completion"]
        )
        == 0
    )
    build.build_suite(test, n=2, tasks=["passkey", "code_completion"])
    manifest = json.loads((dev / "manifest.json").read_text())
    assert manifest["partition"] == "calibration" and "--partition calibration" in manifest["command"]
    for name in ("passkey", "code_completion"):
        d, _ = load_tasks(dev / f"{name}.jsonl")
        assert [x.id for x in d] == [f"{name}-{i:03d}" for i in range(2)]
        t, _ = load_tasks(test / f"{name}.jsonl")
        for x in d:
            chunks = {x.context[i : i + 200] for i in range(0, len(x.context) - 200, 200)}
            assert not any(c in y.context for y in t for c in chunks), x.id


@needs_sources
def test_replication_set_is_fresh_and_prefixed(tmp_path: Path):
    """Another seed on the evaluation partition gives new instances whose ids cannot collide with the shipped ones."""
    rep, base = tmp_path / "rep", tmp_path / "base"
    args = ["--out", str(rep), "--n", "2", "--seed", "9000", "--tasks", "passkey", "--id-prefix", "rep-"]
    assert build.main(args) == 0
    build.build_suite(base, n=2, tasks=["passkey"])
    r, _ = load_tasks(rep / "passkey.jsonl")
    b, _ = load_tasks(base / "passkey.jsonl")
    assert [x.id for x in r] == ["rep-passkey-000", "rep-passkey-001"]
    assert not {x.context for x in r} & {x.context for x in b}
    assert "--seed 9000 --tasks passkey --id-prefix rep-" in json.loads((rep / "manifest.json").read_text())["command"]
