"""Calibration data: our JSONL loader, LongBench conversion and loading, hashing, and the shipped calibration set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from polykv.data import Sample, data_hash, from_longbench_rows, load_hf_dataset, load_samples
from polykv.errors import DataError, PolyKVError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "calibration_data" / "default.jsonl"


def _row(**overrides) -> str:
    row = {"id": "s1", "category": "retrieval", "context": "The key is 7.", "question": "Key?", "answers": ["7"]}
    row.update(overrides)
    return json.dumps({k: v for k, v in row.items() if v is not ...})


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_load_good_file(tmp_path: Path):
    p = _write(tmp_path, [_row(), "", _row(id="s2", category="code", answers=["a", "b"], extra=1)])
    samples = load_samples(p)
    assert samples == [
        Sample("s1", "retrieval", "The key is 7.", "Key?", ["7"]),
        Sample("s2", "code", "The key is 7.", "Key?", ["a", "b"]),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (_row(question=...), "missing field 'question'"),
        (_row(answers="7"), "'answers' must be a list of strings"),
        (_row(answers=[7]), "'answers' must be a list of strings"),
        (_row(answers=[]), "at least one non-empty answer"),
        (_row(context=None), "'context' must be a string"),
        (_row(id=""), "'id' is empty"),
        (_row(id="first"), "duplicate id 'first' (first on line 1)"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, message: str):
    p = _write(tmp_path, [_row(id="first"), _row(id="second"), bad])
    with pytest.raises(DataError) as info:
        load_samples(p)
    text = str(info.value)
    assert f"{p}:3:" in text and message in text
    assert "\n" not in text
    assert isinstance(info.value, PolyKVError)


def test_missing_and_empty_files(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist.*--data"):
        load_samples(tmp_path / "nope.jsonl")
    empty = _write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="is empty"):
        load_samples(empty)


LONGBENCH_ROWS = [
    {
        "input": "Who wrote it?",
        "context": "Doc A. Written by Ann.",
        "answers": ["Ann"],
        "length": 5,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": "abc123",
    },
    {
        "input": "Which class?",
        "context": "Examples...",
        "answers": ["Location"],
        "length": 2,
        "dataset": "trec",
        "language": "en",
        "all_classes": ["Location", "Person"],
        "_id": "def456",
    },
]


def test_from_longbench_rows():
    samples = from_longbench_rows(LONGBENCH_ROWS, "longbench")
    assert samples[0] == Sample("abc123", "hotpotqa", "Doc A. Written by Ann.", "Who wrote it?", ["Ann"])
    assert samples[1].category == "trec" and samples[1].answers == ["Location"]
    plain = from_longbench_rows([{"input": "q", "context": "c", "answers": "a"}], "mine")
    assert plain == [Sample("mine-0", "mine", "c", "q", ["a"])]
    with pytest.raises(DataError, match="row 0: missing LongBench field 'context'"):
        from_longbench_rows([{"input": "q", "answers": ["a"]}], "x")
    with pytest.raises(DataError, match="duplicate _id"):
        from_longbench_rows([LONGBENCH_ROWS[0], LONGBENCH_ROWS[0]], "x")


def test_load_hf_dataset_from_local_longbench_jsonl(tmp_path: Path):
    p = tmp_path / "hotpot.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in LONGBENCH_ROWS), encoding="utf-8")
    samples = load_hf_dataset(str(p))
    assert [s.id for s in samples] == ["abc123", "def456"]
    assert samples[0] == from_longbench_rows(LONGBENCH_ROWS, "hotpot")[0]
    assert len(load_hf_dataset(str(p), limit=1)) == 1
    with pytest.raises(DataError, match="does not exist"):
        load_hf_dataset(str(tmp_path / "missing.jsonl"))


def test_load_hf_dataset_unreachable_hub(monkeypatch: pytest.MonkeyPatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_hf_dataset("THUDM/LongBench:hotpotqa")
    text = str(info.value)
    assert "hub is not reachable" in text and "--data" in text and "\n" not in text

    def missing(*args, **kwargs):
        raise ValueError("Config name is missing")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match="cannot load THUDM/LongBench .*ValueError"):
        load_hf_dataset("THUDM/LongBench")


def test_data_hash_is_stable():
    a = Sample("s1", "retrieval", "ctx \u00e9", "q?", ["42"])
    b = Sample("s2", "code", "def f(): pass", "next?", ["return 1", "x"])
    assert data_hash([a, b]) == "48f6ab5f677a5b92"  # pinned: canonical JSON must not change silently
    assert data_hash([a, b]) == data_hash([Sample(**vars(a)), Sample(**vars(b))])
    assert data_hash([b, a]) != data_hash([a, b])
    assert data_hash([a]) != data_hash([Sample("s1", "retrieval", "ctx \u00e9", "q?", ["43"])])
    assert len(data_hash([])) == 16


# --------------------------------------------------------------------------------------------------- shipped set


@pytest.fixture(scope="module")
def shipped() -> list[Sample]:
    return load_samples(SHIPPED)


def test_shipped_calibration_set(shipped: list[Sample]):
    assert len(shipped) >= 16
    assert len({s.id for s in shipped}) == len(shipped)
    categories = Counter(s.category for s in shipped)
    assert len(categories) >= 5 and min(categories.values()) >= 2
    for s in shipped:
        assert 1000 <= len(s.context) / 3.5 <= 4000, (s.id, len(s.context))
        assert 0 < len(s.answers[0].strip()) <= 100, s.id  # short: calibration teacher-forces answers[0]
        if s.category not in ("code_completion", "license_cloze"):  # these answers are not copied from the context
            assert s.answers[0] in s.context, s.id


def test_shipped_calibration_is_disjoint_from_the_eval_suite(shipped: list[Sample]):
    from polykv.evaluate.suite import load_default_suite

    suite = load_default_suite()
    eval_text = "\0".join(x.context for x in suite)
    cal_text = "\0".join(s.context for s in shipped)
    for s in shipped:
        for offset in range(0, len(s.context) - 200, 200):
            assert s.context[offset : offset + 200] not in eval_text, (s.id, offset)
    for x in suite[::3]:
        for offset in range(0, len(x.context) - 200, 600):
            assert x.context[offset : offset + 200] not in cal_text, (x.id, offset)


def test_shipped_calibration_matches_its_builder_schema(shipped: list[Sample]):
    lines = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert all(set(row) == {"id", "category", "context", "question", "answers"} for row in lines)
    assert [row["id"] for row in lines] == [s.id for s in shipped]


HOLDOUT = ROOT / "calibration_data" / "holdout.jsonl"
#: categories whose text comes from a pool too small to avoid the calibration set's paragraphs; their keys, numbers
#: and words are generated anew, which is what makes them held out
SHARED_HAYSTACK = ("multikey_needles", "variable_tracking", "frequent_words")


def test_holdout_set_is_apart_from_the_calibration_set_and_the_suite(shipped: list[Sample]):
    from polykv.evaluate.suite import load_default_suite

    holdout = load_samples(HOLDOUT)
    assert len(holdout) >= 8 and all(s.id.startswith("holdout-") for s in holdout)
    assert not {s.id for s in holdout} & {s.id for s in shipped}
    assert {s.category for s in holdout} <= {s.category for s in shipped}
    eval_text = "\0".join(x.context for x in load_default_suite())
    cal_text = "\0".join(s.context for s in shipped)
    cal_answers = {(s.category, s.question, s.answers[0]) for s in shipped}
    for s in holdout:
        assert (s.category, s.question, s.answers[0]) not in cal_answers, s.id
        for offset in range(0, len(s.context) - 200, 200):
            assert s.context[offset : offset + 200] not in eval_text, (s.id, offset)
            if s.category not in SHARED_HAYSTACK:
                assert s.context[offset : offset + 200] not in cal_text, (s.id, offset)
