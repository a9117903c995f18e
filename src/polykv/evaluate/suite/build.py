"""Builders of the shipped evaluation suite: one function per task, deterministic for a seed.

Run `python -m polykv.evaluate.suite.build --out DIR` to regenerate `DIR/<task>.jsonl` and `DIR/manifest.json`.
Every builder takes (n, seed, part, size) so that `calibration_data/build.py` reuses the same recipes on the
disjoint calibration partition with other seeds. Texts come from the Python standard library, Debian changelogs
and license files (see `sources.py`); keys, names and numbers are generated. The output depends on the Python and
Debian versions of the machine, so the built files are shipped and the builders are only for regeneration.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from polykv.evaluate.suite.sources import (
    CALIBRATION,
    CHARS_PER_TOKEN,
    EVALUATION,
    ChangelogEntry,
    Docstring,
    Partition,
    SourceFile,
    changelogs,
    docstrings,
    haystack,
    insert_at_depths,
    key_phrase,
    license_text,
    number,
    person,
    python_files,
)
from polykv.evaluate.tasks import levenshtein

BUILDER_VERSION = 1
DEFAULT_SEED = 2000
DEFAULT_N = 30


@dataclass(frozen=True)
class Size:
    """Context length bounds in characters: at least `lo`, aiming at `target`, at most `hi`."""

    lo: int
    target: int
    hi: int


EVAL_SIZE = Size(9000, 10500, 12000)  # ~2.6k-3.4k estimated tokens (chars / 3.5)
# Changelogs are dense in e-mail addresses and version numbers (~2.6 chars per real token), so they are shorter.
CHANGELOG_SIZE = Size(8800, 9300, 10000)

Instance = dict[str, object]


def make_instance(
    task: str, i: int, context: str, question: str, answers: list[str], metric: str, max_new_tokens: int
) -> Instance:
    return {
        "id": f"{task}-{i:03d}",
        "task": task,
        "context": context,
        "question": question,
        "answers": answers,
        "metric": metric,
        "max_new_tokens": max_new_tokens,
    }


def stratified_depth(rng: random.Random, i: int, n: int) -> float:
    """Stratified depth in [0.02, 0.98]: instance i of n lands in the i-th slice, so depths cover the context."""
    return 0.02 + 0.96 * (i + rng.random()) / n


def distinct_items(rng: random.Random, make: Callable[[random.Random], str], k: int) -> list[str]:
    """k distinct generated strings, none a substring of another (substring scoring must not confuse them)."""
    out: list[str] = []
    while len(out) < k:
        s = make(rng)
        if all(s not in o and o not in s for o in out):
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Retrieval in real prose


def build_passkey(n: int, seed: int, part: Partition = EVALUATION, size: Size = EVAL_SIZE) -> list[Instance]:
    """Single needle: one person's 5-digit passkey hidden at a stratified depth in real prose."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, key = person(rng), number(rng, 5)
        needle = f"The passkey for {name} is {key}."
        blocks = haystack(rng, part, size.target - len(needle), size.hi - len(needle) - 2)
        context = insert_at_depths(blocks, [(stratified_depth(rng, i, n), needle)])
        question = f"What is the passkey for {name}? Answer with the number only."
        out.append(make_instance("passkey", i, context, question, [key], "substring", 24))
    return out


def build_multikey_needles(
    n: int, seed: int, part: Partition = EVALUATION, size: Size = EVAL_SIZE, keys: int = 8
) -> list[Instance]:
    """Several key-value needles spread through real prose; the question asks for one of them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        names = distinct_items(rng, key_phrase, keys)
        values = distinct_items(rng, lambda r: number(r, 7), keys)
        needles = [f"The special magic number for {k} is {v}." for k, v in zip(names, values, strict=False)]
        asked = rng.randrange(keys)
        depths = [rng.uniform(0.02, 0.98) for _ in range(keys)]
        depths[asked] = stratified_depth(rng, i, n)
        extra = sum(len(x) + 2 for x in needles)
        blocks = haystack(rng, part, size.target - extra, size.hi - extra)
        context = insert_at_depths(blocks, list(zip(depths, needles, strict=False)))
        question = f"What is the special magic number for {names[asked]}? Answer with the number only."
        out.append(make_instance("multikey_needles", i, context, question, [values[asked]], "substring", 24))
    return out


def build_variable_tracking(
    n: int,
    seed: int,
    part: Partition = EVALUATION,
    size: Size = EVAL_SIZE,
    chains: int = 3,
    hops: tuple[int, ...] = (1, 2),
) -> list[Instance]:
    """Multi-hop chains ("variable A is 12345", "B is the same as A", ...) spread through prose.

    The question asks for the number at the end of one chain; instance i has hops[i % len(hops)] links per chain,
    and the other chains are distractors. Small models find the statements more easily in words than as code.
    """
    rng = random.Random(seed)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for i in range(n):
        h = hops[i % len(hops)]
        names = distinct_items(rng, lambda r: "".join(r.choice(letters) for _ in range(5)), chains * (h + 1))
        values = distinct_items(rng, lambda r: number(r, 5), chains)
        items: list[tuple[float, str]] = []
        ends = []
        for c in range(chains):
            var = names[c * (h + 1) : (c + 1) * (h + 1)]
            depths = sorted(rng.uniform(0.02, 0.98) for _ in var)
            items.append((depths[0], f"The value of variable {var[0]} is {values[c]}."))
            items.extend(
                (d, f"The value of variable {b} is the same as the value of variable {a}.")
                for d, a, b in zip(depths[1:], var, var[1:], strict=False)
            )
            ends.append(var[-1])
        asked = rng.randrange(chains)
        extra = sum(len(t) + 2 for _, t in items)
        blocks = haystack(rng, part, size.target - extra, size.hi - extra)
        context = insert_at_depths(blocks, items)
        question = f"What is the value of variable {ends[asked]}? Answer with the number only."
        out.append(make_instance("variable_tracking", i, context, question, [values[asked]], "substring", 24))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Aggregation

STOPWORDS = frozenset(
    "about above after again against because been before being below between both could does doing down during "
    "each from further have having here into itself more most other ought over same should some such than that "
    "their theirs them themselves then there these they this those through under until very were what when where "
    "which while whom will with would your yours shall must also only within without upon made make used uses".split()
)


def word_pool(part: Partition) -> list[str]:
    """Lowercase words of 4-9 letters seen at least twice in the partition's license texts, in first-seen order."""
    counts: Counter[str] = Counter()
    for name in part.licenses:
        words = re.findall(r"[A-Za-z]+", license_text(name))
        counts.update(w for w in words if 4 <= len(w) <= 9 and w.islower() and w not in STOPWORDS)
    return [w for w, c in counts.items() if c >= 2]


def build_frequent_words(
    n: int, seed: int, part: Partition = EVALUATION, size: Size = EVAL_SIZE, fillers: int = 80
) -> list[Instance]:
    """A word list (one per line) in which one word makes 15% of the entries, two others 5% each and 80 fillers the
    rest; ask for the most frequent one. The evidence is spread over the whole list (aggregation)."""
    rng = random.Random(seed)
    pool = word_pool(part)
    out = []
    for i in range(n):
        vocab = distinct_items(rng, lambda r: r.choice(pool), 3 + fillers)
        avg = sum(len(w) for w in vocab) / len(vocab) + 1  # "word\n"
        total = int(size.target / avg)
        counts = [round(0.15 * total), round(0.05 * total), round(0.05 * total)]
        rest = total - sum(counts)
        counts += [rest // fillers + (1 if j < rest % fillers else 0) for j in range(fillers)]
        words = [w for w, c in zip(vocab, counts, strict=False) for _ in range(c)]
        rng.shuffle(words)
        context = "\n".join(words)
        question = "Which word appears most often in the list above? Answer with the word only."
        out.append(make_instance("frequent_words", i, context, question, [vocab[0]], "substring", 16))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Single- and multi-document QA


def _changelog_windows(rng: random.Random, part: Partition, size: Size) -> Iterator[list[ChangelogEntry]]:
    """An endless stream of windows: runs of consecutive entries of one changelog within the size bounds."""
    logs = [log for log in changelogs(part) if sum(len(e.text) + 2 for e in log) >= size.lo]
    if not logs:
        raise RuntimeError(f"no Debian changelog of {part.name} packages is long enough; is /usr/share/doc there?")
    while True:
        order = logs[:]
        rng.shuffle(order)
        for log in order:
            for _ in range(10):
                start = rng.randrange(len(log))
                window, total = [], 0
                for e in log[start:]:
                    if total + len(e.text) + 2 > size.hi:
                        break
                    window.append(e)
                    total += len(e.text) + 2
                    if total >= size.target:
                        break
                if total >= size.lo and len(window) >= 2:
                    yield window
                    break


def _change_line(rng: random.Random, entry: ChangelogEntry, context: str) -> str | None:
    """A one-line bullet ("* Fix ...") of `entry` with at least 5 words, occurring once in the context, or None."""
    rows = entry.text.splitlines() + [""]
    lines = []
    for ln, nxt in zip(rows, rows[1:], strict=False):
        wrapped = nxt.startswith("    ") and not nxt.strip().startswith(("-", "*", "+"))
        if ln.strip().startswith("* ") and not wrapped:
            lines.append(ln.strip()[2:].strip())
    lines = [
        ln
        for ln in lines
        if len(ln.split()) >= 5
        and len(ln) <= 100
        and context.count(ln) == 1
        and not any(c.isdigit() for c in ln)
        and '"' not in ln
    ]
    return rng.choice(lines) if lines else None


def build_changelog_qa(
    n: int, seed: int, part: Partition = EVALUATION, size: Size = CHANGELOG_SIZE, task: str = "changelog_qa"
) -> list[Instance]:
    """Single-document QA on a real Debian changelog, rotating three questions about one entry.

    Who signed version V; which version made a quoted change; who signed the entry with a quoted change.
    """
    rng = random.Random(seed)
    windows = _changelog_windows(rng, part, size)
    out: list[Instance] = []
    while len(out) < n:
        window = next(windows)
        context = "\n\n".join(e.text for e in window)
        target = window[rng.randrange(len(window))]
        kind = len(out) % 3
        change = _change_line(rng, target, context)
        if kind == 0:
            question = (
                f"In the Debian changelog above, who signed off the entry for version {target.version} of "
                f"{target.source}? Answer with the person's name only."
            )
            answer = target.signer
        elif change is None:
            continue
        elif kind == 1:
            question = (
                f'In the Debian changelog above, which version of {target.source} made the change "{change}"? '
                "Answer with the version number only."
            )
            answer = target.version
        else:
            question = (
                f'In the Debian changelog above, who signed off the entry with the change "{change}"? '
                "Answer with the person's name only."
            )
            answer = target.signer
        out.append(make_instance(task, len(out), context, question, [answer], "f1", 24))
    return out


def _doc_candidates(part: Partition) -> list[Docstring]:
    return [
        d for d in docstrings(part) if 300 <= len(d.text) <= 1600 and len(d.short) >= 5 and not d.short.startswith("_")
    ]


def build_multidoc_retrieval(
    n: int, seed: int, part: Partition = EVALUATION, size: Size = EVAL_SIZE, task: str = "multidoc_retrieval"
) -> list[Instance]:
    """Many titled documents (real docstrings); quote a phrase from one and ask for that document's title."""
    rng = random.Random(seed)
    pool = _doc_candidates(part)
    out: list[Instance] = []
    while len(out) < n:
        docs: list[Docstring] = []
        total = 0
        for d in rng.sample(pool, len(pool)):
            block = len(d.text) + len(d.name) + 20
            if total >= size.target:
                break
            if total + block > size.hi or any(d.short in o.name or o.short in d.name for o in docs):
                continue
            docs.append(d)
            total += block
        if total < size.lo:
            continue
        k = min(len(docs) - 1, int(stratified_depth(rng, len(out), n) * len(docs)))
        target = docs[k]
        phrase = _quote(rng, target, docs)
        if phrase is None:
            continue
        context = "\n\n".join(f"Title: {d.name}\n{d.text}" for d in docs)
        question = f'What is the title of the document that contains the words "{phrase}"? Answer with the title only.'
        answers = list(dict.fromkeys([target.name, target.short]))
        out.append(make_instance(task, len(out), context, question, answers, "substring", 24))
    return out


def _quote(rng: random.Random, target: Docstring, docs: list[Docstring]) -> str | None:
    """Seven consecutive words from one line of `target` that occur in no other document and omit its name."""
    lines = [ln.split() for ln in target.text.splitlines() if len(ln.split()) >= 7]
    rng.shuffle(lines)
    for words in lines:
        a = rng.randrange(len(words) - 6)
        phrase = " ".join(words[a : a + 7])
        if target.short.lower() in phrase.lower() or '"' in phrase:
            continue
        if all(phrase not in " ".join(d.text.split()) for d in docs if d is not target):
            return phrase
    return None


# ---------------------------------------------------------------------------------------------------------------
# Code


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def completion_targets(f: SourceFile) -> list[int]:
    """0-based line numbers of single-line statements worth predicting (no docstrings, pass, bare return...)."""
    lines = f.lines
    out = []
    for node in ast.walk(f.tree):
        if not isinstance(node, ast.stmt) or node.lineno != node.end_lineno or _is_docstring(node):
            continue
        if isinstance(node, (ast.Pass, ast.Break, ast.Continue, ast.Global, ast.Nonlocal)):
            continue
        if isinstance(node, ast.Return) and node.value is None:
            continue
        raw = lines[node.lineno - 1]
        text = raw.strip()
        if raw[: node.col_offset].strip():  # the statement follows "try:", "if x:"... on the same line
            continue
        if 12 <= len(text) <= 90 and not text.startswith(("#", "@")) and ";" not in text:
            out.append(node.lineno - 1)
    return sorted(set(out))


def code_window(lines: list[str], end: int, size: Size) -> str | None:
    """The lines before `end` (trailing blank lines dropped), starting far enough back to reach `size.target`."""
    while end > 0 and not lines[end - 1].strip():
        end -= 1
    total, start = 0, end
    while start > 0 and total < size.target:
        if total + len(lines[start - 1]) + 1 > size.hi:
            break
        start -= 1
        total += len(lines[start]) + 1
    while start < end and not lines[start].strip():
        start += 1
    text = "\n".join(lines[start:end])
    # Data tables (hex codes, escapes) tokenize ~4x denser than code and say little about code completion.
    if sum(c.isdigit() for c in text) > 0.08 * len(text):
        return None
    return text if size.lo <= len(text) <= size.hi else None


def similar_lines(query: str, lines: list[str], k: int, threshold: float) -> list[str]:
    """Up to k of `lines` (stripped) that differ from `query`, start with its first word, and whose edit
    similarity to it is at least `threshold`."""
    head = re.match(r"[\w.]+|\S", query).group()  # type: ignore[union-attr]
    out = []
    for line in lines:
        line = line.strip()
        if line != query and line.startswith(head) and abs(len(line) - len(query)) < len(query) // 2:
            if 1 - levenshtein(line, query) / max(len(line), len(query)) >= threshold:
                out.append(line)
                if len(out) == k:
                    break
    return out


def build_code_completion(
    n: int, seed: int, part: Partition = EVALUATION, size: Size = EVAL_SIZE, task: str = "code_completion"
) -> list[Instance]:
    """Next-line completion on real stdlib source (scored by edit similarity, as LongBench's lcc).

    The target line is never verbatim in the context but always has a similar line there (a sibling call, a
    parallel assignment), so the context helps predict it and losing that part of the cache hurts.
    """
    rng = random.Random(seed)
    files = [f for f in python_files(part) if len(f.text) >= size.target + 2000]
    out: list[Instance] = []
    order: list[SourceFile] = []
    while len(out) < n:
        if not order:
            order = rng.sample(files, len(files))
        f = order.pop()
        lines = f.lines
        targets = [t for t in completion_targets(f) if sum(len(x) + 1 for x in lines[:t]) >= size.target]
        rng.shuffle(targets)
        for t in targets[:40]:
            context = code_window(lines, t, size)
            target = lines[t].strip()
            if context is not None and target not in context and similar_lines(target, context.splitlines(), 1, 0.6):
                break
        else:
            continue
        question = "Continue the Python code above: write its next line. Answer with that line of code only."
        out.append(make_instance(task, len(out), context, question, [target], "edit_sim", 32))
    return out


# Label words are related to the statement kinds but are not Python keywords, so the label set (and which word
# goes with which kind) has to be read off the examples; query lines never contain a label word.
KIND_LABELS = {
    "Import": "module",
    "ImportFrom": "module",
    "FunctionDef": "function",
    "AsyncFunctionDef": "function",
    "Return": "result",
    "Raise": "failure",
    "If": "condition",
    "For": "loop",
    "While": "loop",
    "Assign": "assignment",
    "AugAssign": "assignment",
    "AnnAssign": "assignment",
    "Expr": "call",
}
LABELS = sorted(set(KIND_LABELS.values()))


def labelled_lines(part: Partition) -> dict[str, list[str]]:
    """label -> distinct one-line statements (or compound-statement headers) of the partition's code."""
    out: dict[str, dict[str, None]] = {label: {} for label in LABELS}
    for f in python_files(part):
        lines = f.lines
        for node in ast.walk(f.tree):
            label = KIND_LABELS.get(type(node).__name__)
            if label is None or _is_docstring(node):
                continue
            if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call):
                continue
            if isinstance(node, ast.Return) and node.value is None:
                continue
            text = lines[node.lineno - 1].strip()
            compound = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.For, ast.While))
            if (compound and not text.endswith(":")) or (not compound and node.lineno != node.end_lineno):
                continue
            if 8 <= len(text) <= 80 and not text.startswith(("#", "@", "else", "try")) and ";" not in text:
                out[label].setdefault(text, None)
    return {label: list(v) for label, v in out.items()}


def build_fewshot_classification(
    n: int,
    seed: int,
    part: Partition = EVALUATION,
    size: Size = EVAL_SIZE,
    task: str = "fewshot_classification",
    near_k: int = 3,
    near_sim: float = 0.7,
) -> list[Instance]:
    """In-context classification of code lines into kinds whose label words are only learnable from examples.

    Examples cycle through the labels in random order; `near_k` of them are lines similar to the query (same
    kind, edit similarity >= `near_sim`) placed at random depths, as in-context learning leans on near neighbours.
    """
    rng = random.Random(seed)
    by_label = labelled_lines(part)
    out: list[Instance] = []
    while len(out) < n:
        label = LABELS[len(out) % len(LABELS)]
        query = rng.choice([x for x in by_label[label] if not any(lb in x.lower() for lb in LABELS)])
        pool = by_label[label][:]
        rng.shuffle(pool)
        near = similar_lines(query, pool, near_k, near_sim)
        if len(near) < near_k:
            continue
        blocks: list[str] = []
        total = 0
        while total < size.target:
            cycle = LABELS[:]
            rng.shuffle(cycle)
            for lb in cycle:
                line = rng.choice(by_label[lb])
                if line != query:
                    blocks.append(f"Line: {line}\nKind: {lb}")
                    total += len(blocks[-1]) + 2
        while total > size.hi - 200:
            total -= len(blocks.pop()) + 2
        for line in near:
            blocks.insert(rng.randrange(len(blocks) + 1), f"Line: {line}\nKind: {label}")
        context = "\n\n".join(blocks)
        question = (
            "Classify the next line the way the lines above are classified. Answer with the kind label "
            f"only.\nLine: {query}\nKind:"
        )
        out.append(make_instance(task, len(out), context, question, [label], "substring", 16))
    return out


# ---------------------------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[..., list[Instance]]] = {
    "passkey": build_passkey,
    "multikey_needles": build_multikey_needles,
    "variable_tracking": build_variable_tracking,
    "frequent_words": build_frequent_words,
    "changelog_qa": build_changelog_qa,
    "multidoc_retrieval": build_multidoc_retrieval,
    "code_completion": build_code_completion,
    "fewshot_classification": build_fewshot_classification,
}


def task_seed(seed: int, task: str) -> int:
    """Each task's own seed: the base seed plus the task's position in TASKS (2001, 2002, ... by default)."""
    return seed + 1 + list(TASKS).index(task)


def write_jsonl(path: Path, rows: list[Instance]) -> None:
    """One compact JSON object per line, UTF-8, keys in a fixed order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def length_stats(rows: list[Instance]) -> dict[str, int]:
    chars = sorted(len(str(r["context"])) for r in rows)
    return {
        "n": len(rows),
        "min_chars": chars[0],
        "median_chars": chars[len(chars) // 2],
        "max_chars": chars[-1],
        "min_est_tokens": round(chars[0] / CHARS_PER_TOKEN),
        "max_est_tokens": round(chars[-1] / CHARS_PER_TOKEN),
    }


PARTITIONS = {p.name: p for p in (EVALUATION, CALIBRATION)}


def build_suite(
    out: Path,
    n: int = DEFAULT_N,
    seed: int = DEFAULT_SEED,
    tasks: list[str] | None = None,
    part: Partition = EVALUATION,
    id_prefix: str = "",
) -> dict:
    """Write every task's JSONL and a manifest (counts, lengths, seeds, Python version); returns the manifest.

    `part=CALIBRATION` draws the same tasks from the calibration sources instead: a development split for choosing
    between plans (solver settings, refinement) without looking at the evaluation suite. Another `seed` on the
    evaluation partition gives fresh instances of the suite's own tasks (a replication); `id_prefix` keeps their ids
    apart from the shipped ones so that results of both can be pooled.
    """
    command = f"python -m polykv.evaluate.suite.build --out DIR --n {n} --seed {seed}"
    if tasks:
        command += " --tasks " + " ".join(tasks)
    if part is not EVALUATION:
        command += f" --partition {part.name}"
    if id_prefix:
        command += f" --id-prefix {id_prefix}"
    manifest: dict = {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "partition": part.name,
        "python": sys.version.split()[0],
        "command": command,
        "tasks": {},
    }
    for name in tasks or list(TASKS):
        rows = [{**r, "id": id_prefix + str(r["id"])} for r in TASKS[name](n, task_seed(seed, name), part)]
        write_jsonl(out / f"{name}.jsonl", rows)
        manifest["tasks"][name] = {"seed": task_seed(seed, name), "metric": rows[0]["metric"], **length_stats(rows)}
        print(f"{name}: {json.dumps(manifest['tasks'][name])}", file=sys.stderr)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for <task>.jsonl and manifest.json")
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="instances per task")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed (task k uses seed + k)")
    ap.add_argument("--tasks", nargs="*", choices=list(TASKS), help="only these tasks (default: all)")
    ap.add_argument(
        "--partition",
        choices=list(PARTITIONS),
        default=EVALUATION.name,
        help="source texts: evaluation (the shipped suite) or calibration (a development split)",
    )
    ap.add_argument("--id-prefix", default="", help="prepended to every id, e.g. rep- for a replication set")
    args = ap.parse_args(argv)
    build_suite(args.out, args.n, args.seed, args.tasks, PARTITIONS[args.partition], args.id_prefix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
