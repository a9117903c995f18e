"""Workload families (man pages, C headers): the shipped built files, the text readers, and the builders."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from polykv.calibrate import round_robin
from polykv.data import load_samples
from polykv.evaluate.suite import families as fam
from polykv.evaluate.suite.sources import CALIBRATION, EVALUATION, shares_text
from polykv.evaluate.tasks import METRICS, load_tasks

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "benchmarks" / "generalization"
FAMILY_NAMES = sorted(fam.FAMILIES)
N_EVAL, N_CALIBRATION = 12, 40


def needs(family: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not fam.sources_available(family), reason=f"no {family} sources on this machine")


def _eval_dir(family: str) -> Path:
    return SHIPPED / family / "eval"


def _eval_rows(family: str) -> list:
    out = []
    for path in sorted(_eval_dir(family).glob("*.jsonl")):
        instances, warnings = load_tasks(path)
        assert not warnings, warnings
        out.extend(instances)
    return out


def _kind(task: str) -> str:
    return task.split("_", 1)[1]


# ------------------------------------------------------------------------------------------- shipped built files


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shipped_eval_files_are_valid_tasks(family: str):
    rows = _eval_rows(family)
    tasks = Counter(r.task for r in rows)
    assert set(tasks) == {f"{family}_{k}" for k in fam.kinds(family)}
    assert set(tasks.values()) == {N_EVAL}
    assert len({r.id for r in rows}) == len(rows)
    for r in rows:
        assert r.metric in METRICS and r.id.startswith(f"{r.task}-")
        assert r.max_new_tokens is not None and r.max_new_tokens >= 32
        assert fam.FAMILIES[family].fits(r.context), (r.id, len(r.context))
        if r.metric == "substring":
            assert any(a in r.context for a in r.answers), r.id
        else:
            assert r.metric == "edit_sim" and r.answers[0] not in r.context, r.id


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shipped_manifest_records_the_command_and_counts(family: str):
    manifest = json.loads((_eval_dir(family) / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["family"] == family and manifest["partition"] == EVALUATION.name
    assert manifest["command"].startswith(f"python -m polykv.evaluate.suite.families --family {family} --out DIR")
    assert f"--n {N_EVAL} --seed {manifest['seed']}" in manifest["command"]
    assert {name: t["n"] for name, t in manifest["tasks"].items()} == {
        f"{family}_{k}": N_EVAL for k in fam.kinds(family)
    }
    readme = (SHIPPED / "README.md").read_text(encoding="utf-8")
    assert f"--family {family}" in readme and f"--seed {manifest['seed']}" in readme


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shipped_calibration_file_covers_every_kind(family: str):
    samples = load_samples(SHIPPED / family / "calibration.jsonl")
    assert len(samples) == N_CALIBRATION
    counts = Counter(s.category for s in samples)
    assert set(counts) == set(fam.kinds(family)) and set(counts.values()) == {N_CALIBRATION // len(counts)}
    assert round_robin(samples)[: len(counts)] == samples[: len(counts)]  # the file is already round-robin
    for s in samples:
        assert len(s.answers) == 1 and len(s.answers[0]) <= 100
        assert fam.FAMILIES[family].fits(s.context), s.id
        if s.category != "nextline":
            assert s.answers[0] in s.context, s.id


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shipped_eval_and_calibration_share_no_passage(family: str):
    calibration = "\0".join(s.context for s in load_samples(SHIPPED / family / "calibration.jsonl"))
    for r in _eval_rows(family):
        assert not shares_text(r.context, calibration), r.id


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shipped_family_shares_no_passage_with_the_shipped_data(family: str):
    reference = fam.shipped_reference()
    contexts = [r.context for r in _eval_rows(family)]
    contexts += [s.context for s in load_samples(SHIPPED / family / "calibration.jsonl")]
    for context in contexts[::2]:  # every other one: each check scans the whole suite
        assert not shares_text(context, reference, step=100)


def test_shipped_option_questions_quote_a_real_option_entry():
    rows = [r for r in _eval_rows("manpages") if r.task == "manpages_option"]
    for r in rows:
        phrase = r.question.split('"')[1]
        flat = " ".join(r.context.split())
        assert flat.count(phrase) == 2, r.id  # the real entry and the restating sentence
        assert fam.option_statement(phrase, r.answers[0]) in r.context
        entry = rf"^[^\n]*{re.escape(r.answers[0])}\b[^\n]*\n +{re.escape(phrase[:20])}"
        assert re.search(entry, r.context, re.M), r.id


def test_families_never_share_task_names():
    names = [f"{f}_{k}" for f in FAMILY_NAMES for k in fam.kinds(f)]
    assert len(set(names)) == len(names)
    shipped_suite = {p.stem for p in (ROOT / "src" / "polykv" / "evaluate" / "suite" / "data").glob("*.jsonl")}
    assert not set(names) & shipped_suite


# ------------------------------------------------------------------------------------------- text readers

ROFF = r""".\" a comment
.de XX
.B never shown
..
.TH DEMO 1
.SH NAME
demo \- show \fBthings\fR
.SH DESCRIPTION
.ie n \{\
hidden
.\}
First line
continues here.
.PP
Second \(em paragraph with \*(lqquotes\*(rq and \e backslash.
.TP
.BR \-v ", " \-\-verbose
say more
about it
.SH SEE ALSO
.BR other (1)
"""


def test_roff_reader_keeps_text_and_drops_layout():
    blocks = fam.parse_roff(ROFF)
    assert [(b.kind, b.section) for b in blocks] == [
        ("heading", "NAME"),
        ("text", "NAME"),
        ("heading", "DESCRIPTION"),
        ("text", "DESCRIPTION"),
        ("text", "DESCRIPTION"),
        ("item", "DESCRIPTION"),
        ("heading", "SEE ALSO"),
        ("text", "SEE ALSO"),
    ]
    assert blocks[1].text == "demo - show things"
    assert blocks[3].text == "First line continues here."
    assert blocks[4].text == 'Second -- paragraph with "quotes" and \\ backslash.'
    assert blocks[5].tag == "-v, --verbose" and blocks[5].text == "say more about it"
    assert blocks[5].render() == "-v, --verbose\n       say more about it"
    assert "never shown" not in "".join(b.render() for b in blocks) and "hidden" not in blocks[3].text


def test_unescape_resolves_fonts_specials_and_unicode():
    assert fam.unescape(r"\fIfile\fP\-name \[u00E9]t\(co \s-1small\s0\&.") == "file-name ét(c) small."


def test_legal_comments_are_stripped_from_c():
    text = (
        "/* Copyright 2020 X.\n   Licensed under the GPL. */\n\n\n/* Useful. */\nint a;\n"
        "// SPDX-License-Identifier: MIT\n"
    )
    assert fam.strip_legal(text) == "/* Useful. */\nint a;\n"


def test_c_chunks_split_only_at_top_level():
    text = "struct s {\n  int a;\n\n  int b;\n};\n\n/* one\n\n two */\nint c;\n\n#define D 1\n"
    assert fam.c_chunks(text) == ["struct s {\n  int a;\n\n  int b;\n};", "/* one\n\n two */\nint c;", "#define D 1"]


def test_c_completion_targets_start_whole_statements():
    lines = [
        "/* comment",
        "int in_comment = 1;",
        "*/",
        "extern int first_function (int x);",
        "extern int second (int a,",
        "                   int b);",
        "#define LONG_MACRO_NAME 12",
        "#define CONTINUED(x) \\",
        "   ((x) + 1)",
        "typedef unsigned long handle_t;",
        "  x = y; /* with a comment */",
    ]
    assert fam.c_completion_targets(lines) == [3, 6]


def test_option_answers_skip_generic_and_ambiguous_options():
    def item(tag: str) -> fam.ManBlock:
        return fam.ManBlock("item", "does something useful", "OPTIONS", tag)

    color, scheme, helper = item("-c, --color"), item("--color-scheme=NAME"), item("-h, --help")
    assert fam._option_answers(color, [scheme]) == []
    assert fam._option_answers(scheme, [color]) == ["--color-scheme"]
    assert fam._option_answers(helper, [color]) == []
    assert fam._option_answers(item("-x, --extract"), [color]) == ["--extract"]


def test_json_object_keys_share_no_word():
    obj, asked = fam.json_object(random.Random(0), 30)
    words = [w for k in obj for w in k.split("_")]
    assert len(obj) == 30 and asked in obj and len(set(words)) == len(words)
    assert all(10000 <= v < 100000 for v in obj.values()) and len(set(obj.values())) == 30


def test_token_estimate_sees_dense_text():
    prose = "the quick brown fox jumps over the lazy dog and runs away " * 20
    macros = "#   define BN_MP_INIT_MULTI_C\n" * (len(prose) // 29)
    assert fam.estimated_tokens(macros) > 2 * fam.estimated_tokens(prose)
    assert 0.8 * len(prose) / 4.5 < fam.estimated_tokens(prose) < 1.2 * len(prose) / 4.5


def test_char_depth_counts_characters_not_blocks():
    blocks = ["x" * 1000, "short", "y" * 1000]
    assert fam._char_depth(blocks, 0.0) == 0.0
    assert fam._char_depth(blocks, 0.5) == pytest.approx(1 / 3)
    assert fam._char_depth(blocks, 0.7) == pytest.approx(2 / 3)
    assert fam._char_depth(blocks, 0.9) == 1.0
    assert fam._char_depth(blocks, 1.0) == 1.0


# ------------------------------------------------------------------------------------------- builders (need sources)


@pytest.mark.slow
@pytest.mark.parametrize("family", [pytest.param(f, marks=needs(f)) for f in FAMILY_NAMES])
def test_builders_are_deterministic_and_disjoint(family: str, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--family", family, "--n", "2", "--seed", "77", "--calibration-n", str(len(fam.kinds(family)))]
    assert fam.main([*args, "--out", str(a), "--calibration-out", str(tmp_path / "a.jsonl")]) == 0
    assert fam.main([*args, "--out", str(b), "--calibration-out", str(tmp_path / "b.jsonl")]) == 0
    for path in sorted(a.glob("*.jsonl")):
        assert path.read_bytes() == (b / path.name).read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["command"] == (
        f"python -m polykv.evaluate.suite.families --family {family} --out DIR --n 2 "
        f"--seed 77 --calibration-out FILE --calibration-n {len(fam.kinds(family))}"
    )
    rows = [r for p in sorted(a.glob("*.jsonl")) for r in load_tasks(p)[0]]
    assert len(rows) == 2 * len(fam.kinds(family))
    samples = load_samples(tmp_path / "a.jsonl")
    assert [s.category for s in samples] == list(fam.kinds(family))
    calibration = "\0".join(s.context for s in samples)
    for r in rows:
        assert not shares_text(r.context, calibration)
        assert r.metric == "edit_sim" or any(x in r.context for x in r.answers)
    other = fam.build_eval(family, 2, 78, reference="")
    assert all(o["context"] != r.context for rs in other.values() for o in rs for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("family", [pytest.param(f, marks=needs(f)) for f in FAMILY_NAMES])
def test_partitions_use_disjoint_source_names(family: str):
    if family == "manpages":
        names = {p: {page.name for page in fam.man_pages(p)} for p in (EVALUATION, CALIBRATION)}
    else:
        names = {p: {f.name.split("/")[0] for f in fam.c_files(p)} for p in (EVALUATION, CALIBRATION)}
    assert names[EVALUATION] and names[CALIBRATION] and not names[EVALUATION] & names[CALIBRATION]
    assert all(re.match(r"[n-z]", n, re.I) for n in names[EVALUATION])
    assert all(re.match(r"[a-m]", n, re.I) for n in names[CALIBRATION])
