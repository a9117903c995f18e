"""Build PolyKV's shipped calibration set: `python calibration_data/build.py --out calibration_data/default.jsonl`.

Eight categories x 4 samples, contexts of ~9k-12k characters (~2.6k-3.4k tokens at chars / 3.5), short answers
(calibration teacher-forces answers[0]). The text comes from the *calibration* partition of
`polykv.evaluate.suite.sources` (stdlib modules a-m, Debian changelogs of source packages a-m, the Apache-2.0,
MPL-2.0, Artistic and CC0-1.0 licenses), so it shares no text with the evaluation suite (modules n-z, changelogs
n-z, the GNU licenses and MPL-1.1); candidates that still share a passage with the built suite are dropped. Seeds
are 1001-1008 (the suite uses 2001-2008). The output depends on the machine's Python and Debian versions: the
built file is shipped and this script regenerates it. Build the suite first.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import json
import random
import re
import sys
from pathlib import Path

try:
    import polykv  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polykv.evaluate.suite.build import (
    STOPWORDS,
    Instance,
    Size,
    build_changelog_qa,
    build_code_completion,
    build_frequent_words,
    build_multidoc_retrieval,
    build_multikey_needles,
    build_variable_tracking,
)
from polykv.evaluate.suite.sources import (
    CALIBRATION,
    CHARS_PER_TOKEN,
    Partition,
    license_text,
    python_files,
    shares_text,
)

# The same lengths as the evaluation suite (EVAL_SIZE). Budgets are absolute token counts, so the curves must be
# measured at the context lengths the plans will serve: with shorter calibration contexts (5.5k-10k characters,
# the first version of this file) a 2048-token budget kept the whole of half the samples, looked free, and the
# plans spent it on layers that then lost the needle at the suite's ~2.5k-token prompts.
CAL_SIZE = Size(9000, 10500, 12000)
DEFAULT_SEED = 1000
SUITE_DIR = Path(__file__).resolve().parents[1] / "src" / "polykv" / "evaluate" / "suite" / "data"


def _cal(category: str, i: int, context: str, question: str, answer: str) -> Instance:
    return {
        "id": f"{category}-{i:02d}",
        "category": category,
        "context": context,
        "question": question,
        "answers": [answer],
    }


def build_code_qa(n: int, seed: int, part: Partition = CALIBRATION, size: Size = CAL_SIZE) -> list[Instance]:
    """A window of real source containing a function; ask one parameter's default value (a literal)."""
    rng = random.Random(seed)
    files = [f for f in python_files(part) if len(f.text) >= size.target]
    out: list[Instance] = []
    while len(out) < n:
        f = rng.choice(files)
        lines = f.lines
        names = [x.name for x in ast.walk(f.tree) if isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef))]
        cands = []
        for node in ast.walk(f.tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or names.count(node.name) > 1:
                continue
            a = node.args
            positional = a.args[len(a.args) - len(a.defaults) :]
            pairs = list(zip(positional, a.defaults, strict=True)) + list(zip(a.kwonlyargs, a.kw_defaults, strict=True))
            for arg, default in pairs:
                text = ast.get_source_segment(f.text, default) if isinstance(default, ast.Constant) else None
                if text and len(text) <= 20:  # the literal as written in the source
                    cands.append((node, arg.arg, text))
        if len(out) % 2 == 0:  # half the questions ask for a default other than None
            cands = [c for c in cands if c[2] != "None"]
        if not cands:
            continue
        node, arg, value = rng.choice(cands)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line) + 1)
        head, body = node.lineno - 1, node.body[0].lineno - 1
        first = max(0, offsets[head] - int(rng.uniform(0.1, 0.9) * size.target))
        start = bisect.bisect_right(offsets, first) - 1
        end = max(body + 1, bisect.bisect_left(offsets, offsets[start] + size.target))
        context = "\n".join(lines[start:end]).strip("\n")
        if not size.lo <= len(context) <= size.hi:
            continue
        question = (
            f"In the code above, what is the default value of the parameter `{arg}` of the function "
            f"`{node.name}`? Answer with the value only."
        )
        out.append(_cal("code_qa", len(out), context, question, value))
    return out


def build_license_cloze(n: int, seed: int, part: Partition = CALIBRATION, size: Size = CAL_SIZE) -> list[Instance]:
    """A stretch of a real license text; quote a passage from it with one word blanked and ask for the word."""
    rng = random.Random(seed)
    texts = [t for t in (license_text(x) for x in part.licenses) if len(t) >= size.lo]
    out: list[Instance] = []
    while len(out) < n:
        paras = [p.strip("\n") for p in re.split(r"\n\s*\n", texts[len(out) % len(texts)]) if p.strip()]
        start = rng.randrange(len(paras))
        window: list[str] = []
        for p in paras[start:]:
            if sum(len(x) + 2 for x in window) + len(p) > size.hi:
                break
            window.append(p)
        context = "\n\n".join(window)
        if len(context) < size.lo:
            continue
        flat = " ".join(context.split())
        words = flat.split(" ")
        spots = [
            j
            for j in range(8, len(words) - 8)
            if words[j].isalpha() and words[j].islower() and len(words[j]) >= 6 and words[j] not in STOPWORDS
        ]
        rng.shuffle(spots)
        for j in spots:
            passage = " ".join(words[j - 8 : j + 9])
            if flat.count(passage) == 1:
                blanked = " ".join(words[j - 8 : j] + ["____"] + words[j + 1 : j + 9])
                question = (
                    f'One word is missing from this passage of the text above: "{blanked}". '
                    "What is the missing word? Answer with the word only."
                )
                out.append(_cal("license_cloze", len(out), context, question, words[j]))
                break
    return out


def _from_suite(category: str, rows: list[Instance]) -> list[Instance]:
    """Suite instances as calibration samples (category, context, question, first answer)."""
    return [
        _cal(category, i, str(r["context"]), str(r["question"]), str(r["answers"][0]))  # type: ignore[index]
        for i, r in enumerate(rows)
    ]


CATEGORIES = {
    "code_completion": lambda n, s: _from_suite("code_completion", build_code_completion(n, s, CALIBRATION, CAL_SIZE)),
    "code_qa": build_code_qa,
    "doc_retrieval": lambda n, s: _from_suite("doc_retrieval", build_multidoc_retrieval(n, s, CALIBRATION, CAL_SIZE)),
    "license_cloze": build_license_cloze,
    "changelog_qa": lambda n, s: _from_suite("changelog_qa", build_changelog_qa(n, s, CALIBRATION, CAL_SIZE)),
    "multikey_needles": lambda n, s: _from_suite(
        "multikey_needles", build_multikey_needles(n, s, CALIBRATION, CAL_SIZE, keys=4)
    ),
    "variable_tracking": lambda n, s: _from_suite(
        "variable_tracking", build_variable_tracking(n, s, CALIBRATION, CAL_SIZE, chains=3, hops=(2,))
    ),
    "frequent_words": lambda n, s: _from_suite(
        "frequent_words", build_frequent_words(n, s, CALIBRATION, CAL_SIZE, fillers=60)
    ),
}


def suite_text(suite: Path, exclude: tuple[Path, ...] = ()) -> str:
    """All contexts and questions of the evaluation suite in `suite` (its *.jsonl files) and of the JSONL files in
    `exclude` (e.g. another calibration set the output must not repeat), joined."""
    files = sorted(suite.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no evaluation suite in {suite}; build it first (python -m polykv.evaluate.suite.build)")
    missing = [str(f) for f in exclude if not f.is_file()]
    if missing:
        raise SystemExit(f"--exclude {', '.join(missing)}: no such file")
    files += list(exclude)
    parts = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                parts += [row["context"], row["question"]]
    return "\0".join(parts)


def build(
    per_category: int = 4,
    seed: int = DEFAULT_SEED,
    suite: Path = SUITE_DIR,
    exclude: tuple[Path, ...] = (),
    id_prefix: str = "",
    tries: int = 3,
    categories: tuple[str, ...] | None = None,
) -> list[Instance]:
    """All categories in a fixed order; category k uses seed + 1 + k.

    Each category makes `tries` x the candidates it needs and keeps the first ones sharing no 250-character passage
    with the evaluation suite, so the two stay disjoint even where the sources quote each other.
    """
    reference = suite_text(suite, exclude)
    rows: list[Instance] = []
    for k, (name, fn) in enumerate(CATEGORIES.items()):
        if categories is not None and name not in categories:
            continue
        candidates = fn(tries * per_category, seed + 1 + k)
        disjoint = [r for r in candidates if not shares_text(str(r["context"]), reference)]
        kept = disjoint[:per_category]
        if len(kept) < per_category:
            raise SystemExit(f"{name}: only {len(kept)} candidates are disjoint from the evaluation suite")
        for i, r in enumerate(kept):
            r["id"] = f"{id_prefix}{name}-{i:02d}"
        chars = [len(str(r["context"])) for r in kept]
        print(
            f"{name}: {len(kept)} samples ({len(candidates) - len(disjoint)} candidates overlapped), {min(chars)}-"
            f"{max(chars)} chars (~{min(chars) / CHARS_PER_TOKEN:.0f}-{max(chars) / CHARS_PER_TOKEN:.0f} tokens)",
            file=sys.stderr,
        )
        rows.extend(kept)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output JSONL path")
    ap.add_argument("--per-category", type=int, default=4, help="samples per category (8 categories)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed (category k uses seed + 1 + k)")
    ap.add_argument("--suite", type=Path, default=SUITE_DIR, help="evaluation suite to stay disjoint from")
    ap.add_argument(
        "--exclude",
        type=Path,
        nargs="*",
        default=[],
        help="further JSONL files to stay disjoint from (e.g. default.jsonl when building a held-out set)",
    )
    ap.add_argument("--id-prefix", default="", help="prefix for every id (keeps a held-out set's ids apart)")
    ap.add_argument("--tries", type=int, default=3, help="candidates made per sample needed (more for --exclude)")
    ap.add_argument("--categories", nargs="*", choices=list(CATEGORIES), help="only these (default: all)")
    args = ap.parse_args(argv)
    rows = build(
        args.per_category,
        args.seed,
        args.suite,
        tuple(args.exclude),
        args.id_prefix,
        args.tries,
        tuple(args.categories) if args.categories else None,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} samples to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
