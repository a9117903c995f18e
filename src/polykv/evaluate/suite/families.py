"""Workload families for a generalization benchmark: the suite's task recipes on text the shipped data never uses.

The shipped suite and calibration set are built from the Python standard library, Debian changelogs and license
texts. A plan solved on them may fit those texts; a *family* asks the same kinds of question of other text found
on a Debian machine, to see whether the plan still holds there:

- `manpages`: man pages (sections 1, 5, 7 and 8, roff turned into plain text by a small pure-Python reader), as
  prose haystacks and for an option lookup ("which option is described as ...?" about real option lists).
- `csource`: C headers from /usr/include (C++ trees and files left out), as code haystacks and for next-line
  completion.

Every family has five task kinds: `needle` (one fact at a stratified depth), `multikey` (several key-value facts,
one asked), `vartrack` (chains of assignments), `json_lookup` (a JSON object embedded in the text, one key asked)
and a fifth of its own (`option` for man pages, `nextline` for C). Evaluation instances come from names n-z (page
names, /usr/include entries) and calibration samples from a-m, like `sources.py`'s partitions; a calibration
sample is also dropped if it shares a 200-character passage with the family's evaluation instances, and both are
kept apart from the shipped suite and calibration set the same way.

    python -m polykv.evaluate.suite.families --family manpages --out DIR --n 12 --seed S \
        --calibration-out FILE --calibration-n 40

The sources differ between machines, so the built files are shipped (benchmarks/generalization/) and this module
only regenerates them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from polykv.calibrate import default_data_path
from polykv.evaluate.suite import default_suite_path
from polykv.evaluate.suite.build import (
    Instance,
    Size,
    code_window,
    distinct_items,
    length_stats,
    make_instance,
    similar_lines,
    stratified_depth,
    write_jsonl,
)
from polykv.evaluate.suite.sources import (
    ADJECTIVES,
    CALIBRATION,
    EVALUATION,
    NOUNS,
    Partition,
    insert_at_depths,
    number,
    shares_text,
)

FAMILY_BUILDER_VERSION = 1
MAN_SIZE = Size(8500, 9000, 9500)  # ~2.4k-2.7k estimated tokens (chars / 3.5)
# C headers are dense in capitals, digits and punctuation: SmolLM2's tokenizer gives ~2.8 characters per token
# there (3.7 in man pages), so their contexts are shorter to reach the same ~2.5k-3k real tokens.
C_SIZE = Size(7000, 7500, 8000)
MAX_EST_TOKENS = 3300  # by `estimated_tokens`; keeps every prompt well inside a 4096-token --max-context
DEFAULT_SEED = 3000
DEFAULT_N = 12
DEFAULT_CALIBRATION_N = 40
CALIBRATION_SEED_OFFSET = 500  # calibration kind k uses seed + 501 + k, so no generated fact repeats an eval one

MAN_DIR = Path("/usr/share/man")
MAN_SECTIONS = ("man1", "man5", "man7", "man8")
INCLUDE_DIR = Path("/usr/include")

_PIECE = re.compile(r" ?[a-z]+| ?[A-Z][a-z]+| ?[A-Z]+(?![a-z])| ?\d| ?[^\sA-Za-z\d]+|\s+")


def estimated_tokens(text: str) -> float:
    """A tokenizer-free token count that, unlike chars / 3.5, sees what BPE vocabularies split finely.

    Digits are one token each, runs of capitals about one per two letters, punctuation about one per character,
    lowercase words one each. The weights are a least-squares fit to SmolLM2's tokenizer on the shipped suite and
    these families (90 % of contexts within -7 % .. +9 %); used only to reject dense windows (tables of
    upper-case macros, hex), not to size contexts.
    """
    digits = upper = words = punct = spaces = 0
    for piece in _PIECE.findall(text):
        p = piece.strip()
        if not p:
            spaces += 1
        elif p[0].isdigit():
            digits += 1
        elif p.isupper():
            upper += len(p)
        elif p.isalpha():
            words += 1 + len(p) // 8
        else:
            punct += len(p)
    return 1.5 * digits + 0.5 * upper + 0.9 * words + 0.75 * punct + 1.2 * spaces


# ---------------------------------------------------------------------------------------------------------------
# Man pages: roff to plain text

# Thousands of generated cloud-CLI pages that differ in a few words would dominate any sample of man1.
_SKIP_PAGE_PREFIXES = ("gcloud",)
# Sections that are boilerplate shared between pages (credits, licences, cross-references).
_SKIP_SECTIONS = frozenset(
    {
        "SEE ALSO",
        "AUTHOR",
        "AUTHORS",
        "COPYRIGHT",
        "COLOPHON",
        "REPORTING BUGS",
        "LICENSE",
        "LICENCE",
        "COPYING",
        "AVAILABILITY",
        "HISTORY",
        "ACKNOWLEDGEMENTS",
        "ACKNOWLEDGMENTS",
        "TRANSLATION",
        "THANKS",
        "CREDITS",
    }
)
_SPECIAL = {
    "em": "--",
    "en": "-",
    "hy": "-",
    "mi": "-",
    "aq": "'",
    "dq": '"',
    "lq": '"',
    "rq": '"',
    "oq": "'",
    "cq": "'",
    "bu": "*",
    "co": "(c)",
    "rg": "(R)",
    "tm": "(TM)",
    "bv": "|",
    "ba": "|",
    "ti": "~",
    "ha": "^",
    "rs": "\\",
    "sl": "/",
    "ga": "`",
    "at": "@",
    "sh": "#",
    "dg": "+",
    "mu": "x",
    "di": "/",
    "+-": "+-",
    "<=": "<=",
    ">=": ">=",
    "!=": "!=",
    "->": "->",
    "<-": "<-",
    "=>": "=>",
    "aa": "'",
    "ra": ">",
    "la": "<",
    "Fo": "<<",
    "Fc": ">>",
    "lB": "[",
    "rB": "]",
    "lC": "{",
    "rC": "}",
    "pl": "+",
    "eq": "=",
    "ua": "^",
    "de": " degrees",
    "fm": "'",
    "sq": "*",
    "ss": "ss",
    "'e": "e",
    "`e": "e",
    "'a": "a",
    ":u": "u",
    ":o": "o",
    ":a": "a",
    "cq'": "'",
}
_STRINGS = {
    "lq": '"',
    "rq": '"',
    'L"': '"',
    'R"': '"',
    "C`": '"',
    "C'": '"',
    "Aq": "'",
    "--": "--",
    "PI": "pi",
    "R": "(R)",
    "Tm": "(TM)",
    "C+": "C++",
    "Ba": "|",
    "Ge": ">=",
    "Le": "<=",
    "Lq": '"',
    "Rq": '"',
    "Am": "&",
}
_SINGLE = {
    "-": "-",
    "e": "\\",
    "\\": "\\",
    "0": " ",
    " ": " ",
    "~": " ",
    "t": " ",
    ".": ".",
    "'": "'",
    "`": "`",
    "E": "\\",
}
_ESCAPE = re.compile(
    r"""\\(?:
        \((?P<special>..)
      | \[(?P<long>[^\]]*)\]
      | \*(?:\((?P<str2>..)|\[(?P<strl>[^\]]*)\]|(?P<str1>.))
      | f(?:\(..|\[[^\]]*\]|.)
      | s[+-]?(?:\(\d\d|\[\d+\]|\d)
      | [hvwNXbolLxDZRS](?:'[^']*'|"[^"]*")
      | [nkgmMYV](?:\(..|\[[^\]]*\]|[+-]?.)
      | (?P<char>.)
    )""",
    re.X,
)
_REQUEST = re.compile(r"^[.'][ \t]*([^\s\\]*)[ \t]*(.*)$")
_ARG = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
_FILL_BREAKS = frozenset({"PP", "LP", "P", "sp", "HP", "Sp", "br", "ne"})
_JOINED = frozenset({"BR", "RB", "IR", "RI", "BI", "IB"})
_SPACED = frozenset({"B", "I", "SM", "SB", "CW", "TQ_TEXT"})
_SKIP_BLOCKS = frozenset({"de", "de1", "am", "ig", "ds1"})
_CONDITIONALS = frozenset({"if", "ie", "el", "while"})


def _strip_comment(line: str) -> str:
    r"""The line without its roff comment (from \" or \# on; an escaped backslash does not start one)."""
    i = 0
    while (j := line.find("\\", i)) >= 0 and j + 1 < len(line):
        if line[j + 1] in '"#':
            return line[:j]
        i = j + 2
    return line


def _escape(m: re.Match[str]) -> str:
    if m.group("special") is not None:
        return _SPECIAL.get(m.group("special"), "")
    if m.group("long") is not None:
        name = m.group("long")
        if re.fullmatch(r"u[0-9A-Fa-f]{4,5}", name):
            return chr(int(name[1:], 16))
        return _SPECIAL.get(name, "")
    for key in ("str2", "strl", "str1"):
        if m.group(key) is not None:
            return _STRINGS.get(m.group(key), "")
    if m.group("char") is not None:
        return _SINGLE.get(m.group("char"), "")
    return ""


def unescape(text: str) -> str:
    """Roff text with escapes resolved: fonts and sizes dropped, special characters as ASCII where possible."""
    return _ESCAPE.sub(_escape, text)


def _args(rest: str) -> list[str]:
    """A request's arguments: blank-separated, double quotes group words ("" inside quotes is a quote)."""
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2) for m in _ARG.finditer(rest)]


def _join_continuations(lines: list[str]) -> list[str]:
    """Lines ending in an odd number of backslashes continue on the next line."""
    out: list[str] = []
    carry = ""
    for line in lines:
        line = carry + line
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            carry = line[:-1]
            continue
        carry = ""
        out.append(line)
    if carry:
        out.append(carry)
    return out


@dataclass(frozen=True)
class ManBlock:
    """One block of a rendered man page: a heading, a filled paragraph, a tagged item (option) or verbatim lines."""

    kind: str  # "heading" | "text" | "item" | "pre"
    text: str
    section: str
    tag: str = ""

    def render(self) -> str:
        if self.kind == "item":
            return f"{self.tag}\n       {self.text}" if self.text else self.tag
        return self.text


class _RoffReader:
    """Collects ManBlocks from roff (man macros) one source line at a time."""

    def __init__(self) -> None:
        self.blocks: list[ManBlock] = []
        self.section = ""
        self.buf: list[str] = []
        self.tag: str | None = None
        self.want_tag = False
        self.more_tag = False
        self.fill = True

    def flush(self) -> None:
        if self.fill:
            text = " ".join(" ".join(self.buf).split())
        else:
            text = "\n".join(self.buf).strip("\n")
        if self.tag is not None and self.tag:
            self.blocks.append(ManBlock("item", text, self.section, self.tag))
        elif text.strip():
            self.blocks.append(ManBlock("text" if self.fill else "pre", text, self.section))
        self.buf, self.tag, self.want_tag, self.more_tag = [], None, False, False

    def text(self, line: str) -> None:
        if self.want_tag:
            tag = " ".join(line.split())
            self.tag = f"{self.tag}, {tag}" if self.more_tag and self.tag else tag
            self.want_tag = self.more_tag = False
        elif self.fill:
            if line.strip():
                self.buf.append(line)
            elif self.buf:
                self.flush()
        else:
            self.buf.append(line.rstrip())

    def heading(self, title: str) -> None:
        self.flush()
        self.section = " ".join(title.upper().split())
        if self.section:
            self.blocks.append(ManBlock("heading", self.section, self.section))

    def request(self, name: str, args: list[str]) -> None:
        if name in ("SH", "SS"):
            self.heading(" ".join(unescape(a) for a in args))
        elif name == "TP":
            self.flush()
            self.want_tag = True
            self.tag = ""
        elif name == "TQ":
            self.want_tag = self.more_tag = True
        elif name == "IP":
            self.flush()
            tag = unescape(args[0]).strip() if args else ""
            if tag and tag not in ("*", "-", "o", "+-"):
                self.tag = tag
        elif name in _FILL_BREAKS:
            if name == "br" and self.fill:
                return
            self.flush()
        elif name in ("nf", "EX", "Vb"):
            self.flush()
            self.fill = False
        elif name in ("fi", "EE", "Ve"):
            self.flush()
            self.fill = True
        elif name in _JOINED:
            self.text("".join(unescape(a) for a in args))
        elif name in _SPACED and args:
            self.text(" ".join(unescape(a) for a in args))
        elif name == "UR" or name == "MT":
            return
        elif name in ("UE", "ME") and args:
            self.text(unescape(args[0]))


def parse_roff(source: str) -> list[ManBlock]:
    """The blocks of a man page written with the man macros (mdoc pages are not read: see `man_pages`).

    Macro definitions, conditionals, tables and requests that only lay out the page are skipped.
    """
    reader = _RoffReader()
    skip_until_dots = False
    brace_depth = 0
    in_table = False
    for raw in _join_continuations(source.splitlines()):
        if skip_until_dots:
            skip_until_dots = raw.strip() != ".."
            continue
        if brace_depth > 0:
            brace_depth += raw.count("\\{") - raw.count("\\}")
            continue
        line = _strip_comment(raw)
        m = _REQUEST.match(line) if line[:1] in ".'" else None
        if m is None:
            if not in_table:
                reader.text(unescape(line))
            continue
        name, rest = m.group(1), m.group(2)
        if name == "TS":
            in_table = True
        elif name == "TE":
            in_table = False
        elif name in _SKIP_BLOCKS:
            skip_until_dots = True
        elif name in _CONDITIONALS:
            brace_depth = max(0, line.count("\\{") - line.count("\\}"))
        elif not in_table:
            reader.request(name, _args(rest))
    reader.flush()
    return reader.blocks


@dataclass(frozen=True)
class ManPage:
    """A man page: its name (file name without section), and its blocks without boilerplate sections."""

    name: str
    blocks: tuple[ManBlock, ...]


_MAN_NAME = re.compile(r"^(.+?)\.\d\w*\.gz$")


def _man_files() -> list[tuple[str, Path]]:
    """(page name, path) of every distinct gzip'd page file in MAN_SECTIONS, sorted; symlinks count once."""
    seen: set[Path] = set()
    out: list[tuple[str, Path]] = []
    for section in MAN_SECTIONS:
        for path in sorted((MAN_DIR / section).glob("*.gz")):
            real = path.resolve()
            m = _MAN_NAME.match(real.name)
            if m is None or real in seen or not real.is_file() or real.name.startswith(_SKIP_PAGE_PREFIXES):
                continue
            seen.add(real)
            out.append((m.group(1), real))
    return sorted(out)


def _read_page(path: Path) -> str | None:
    """The page's roff source, or None if unreadable, an `.so` redirect or written with the mdoc macros."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    except (OSError, EOFError):
        return None
    if re.search(r"^\.(so|Dd|Sh)\b", text, re.M):
        return None
    return text


@cache
def man_pages(part: Partition) -> tuple[ManPage, ...]:
    """The partition's man pages (by the page name's first letter), boilerplate sections and repeated blocks removed.

    A block (of 60 characters or more) that occurs in two pages of the partition is dropped from both, and so is
    every page whose text repeats an earlier page's: generated families of pages share whole paragraphs.
    """
    pages: list[ManPage] = []
    texts: set[str] = set()
    for name, path in _man_files():
        if not part.owns(name):
            continue
        source = _read_page(path)
        if source is None:
            continue
        blocks = tuple(b for b in parse_roff(source) if b.section not in _SKIP_SECTIONS)
        digest = "\n".join(b.render() for b in blocks)
        if digest in texts or len(digest) < 500:
            continue
        texts.add(digest)
        pages.append(ManPage(name, blocks))
    counts: dict[str, int] = {}
    for page in pages:
        for text in {b.render() for b in page.blocks}:
            counts[text] = counts.get(text, 0) + 1
    kept = [
        ManPage(p.name, tuple(b for b in p.blocks if len(b.render()) < 60 or counts[b.render()] == 1)) for p in pages
    ]
    return tuple(p for p in kept if p.blocks)


# ---------------------------------------------------------------------------------------------------------------
# C headers

_CPP_TREES = ("c++", "llvm", "node")  # C++ libraries under /usr/include (llvm-14, llvm-c-14, node, c++/12, ...)
# C++ in headers: declarations, std headers without .h, and namespace macros (ICU's C headers wrap C++ in them).
_CPP = re.compile(
    r"^\s*(namespace\s+\w+|template\s*<|class\s+\w+\s*[:{]|public:|private:|#include\s*<\w+>|\w*NAMESPACE_BEGIN\b)",
    re.M,
)
_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_LEGAL = re.compile(r"copyright|licen[cs]e|free software|warranty|all rights reserved", re.I)


@dataclass(frozen=True)
class CFile:
    """One C header: its path under /usr/include and its text without legal comments."""

    name: str
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


def strip_legal(text: str) -> str:
    """C text without the comments and `//` lines that carry copyright or licence terms (shared boilerplate)."""
    text = _BLOCK_COMMENT.sub(lambda m: "" if _LEGAL.search(m.group()) else m.group(), text)
    text = "\n".join(ln for ln in text.splitlines() if not (ln.lstrip().startswith("//") and _LEGAL.search(ln)))
    return re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text).strip("\n") + "\n"


def _owner(rel: Path) -> str:
    """The name a header is partitioned by: its top-level entry under /usr/include (a file or directory name)."""
    return rel.parts[0]


@cache
def c_files(part: Partition) -> tuple[CFile, ...]:
    """The partition's C headers (by the first letter of their top-level /usr/include entry), in sorted path order.

    C++ trees and headers that read as C++ are left out; a file counts once (symlinks, copies).
    """
    seen: set[str] = set()
    out: list[CFile] = []
    for path in sorted(INCLUDE_DIR.rglob("*.h")):
        rel = path.relative_to(INCLUDE_DIR)
        if rel.parts[0].startswith(_CPP_TREES) or not part.owns(_owner(rel)) or not path.is_file():
            continue
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if _CPP.search(raw) or raw.count("::") > 3:
            continue
        text = strip_legal(raw)
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest in seen or len(text) < 1000:
            continue
        seen.add(digest)
        out.append(CFile(str(rel), text))
    return tuple(out)


def _comment_after(line: str, inside: bool) -> bool:
    """Whether a /* comment is still open at the end of `line`, given whether one was open at its start."""
    i = 0
    while i < len(line):
        if inside:
            j = line.find("*/", i)
            if j < 0:
                return True
            inside, i = False, j + 2
        else:
            j, k = line.find("/*", i), line.find("//", i)
            if j < 0 or 0 <= k < j:
                return False
            inside, i = True, j + 2
    return inside


def c_chunks(text: str) -> list[str]:
    """Top-level pieces of C text: split at blank lines outside comments and braces, so inserts land between them."""
    chunks: list[list[str]] = [[]]
    depth, inside = 0, False
    for line in text.splitlines():
        if not line.strip() and depth == 0 and not inside:
            if chunks[-1]:
                chunks.append([])
            continue
        if not inside:
            depth = max(0, depth + line.count("{") - line.count("}"))
        inside = _comment_after(line, inside)
        chunks[-1].append(line)
    return ["\n".join(c) for c in chunks if c]


def _ends_statement(prev: str) -> bool:
    """True if the line after `prev` starts a new statement or declaration."""
    if not prev:
        return True
    if prev.startswith("#"):
        return not prev.endswith("\\")
    return prev.endswith((";", "{", "}", "*/"))


def _c_statement(line: str) -> bool:
    """A one-line declaration, statement or #define/#include worth predicting (no comments, balanced parentheses)."""
    if not 12 <= len(line) <= 90 or "/*" in line or "//" in line or line.count("(") != line.count(")"):
        return False
    if line.startswith(("#define", "#include")):
        return not line.endswith("\\")
    return line.endswith(";") and not line.startswith(("}", "{", "*", "#"))


def c_completion_targets(lines: list[str]) -> list[int]:
    """0-based numbers of lines that hold a whole C statement and follow a finished one (outside comments)."""
    out = []
    inside, prev = False, ""
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            continue
        if not inside and _ends_statement(prev) and _c_statement(line):
            out.append(i)
        inside = _comment_after(line, inside)
        prev = line
    return out


# ---------------------------------------------------------------------------------------------------------------
# Haystacks: contiguous stretches of real text, as a list of blocks to insert facts between


def _digit_heavy(blocks: list[str]) -> bool:
    """Tables of numbers tokenize ~4x denser than text and bury generated numbers among real ones."""
    text = "".join(blocks)
    return sum(c.isdigit() for c in text) > 0.06 * max(1, len(text))


def man_blocks(rng: random.Random, part: Partition, target: int, limit: int) -> list[ManBlock]:
    """Blocks of random man pages, each page read on from a random block, totalling target - 400 .. limit chars."""
    pages = man_pages(part)
    while True:
        out: list[ManBlock] = []
        total = 0
        for page in rng.sample(pages, min(20, len(pages))):
            if total >= target:
                break
            for block in page.blocks[rng.randrange(len(page.blocks)) :]:
                size = len(block.render()) + 2
                if total + size > limit:
                    break
                out.append(block)
                total += size
                if total >= target:
                    break
        if total >= target - 400 and not _digit_heavy([b.render() for b in out]):
            return out


def man_haystack(rng: random.Random, part: Partition, target: int, limit: int) -> list[str]:
    """`man_blocks` rendered as text."""
    return [b.render() for b in man_blocks(rng, part, target, limit)]


def c_haystack(rng: random.Random, part: Partition, target: int, limit: int) -> list[str]:
    """Consecutive top-level chunks of one random C header, totalling target - 400 .. limit characters."""
    files = [f for f in c_files(part) if len(f.text) >= target]
    while True:
        chunks = c_chunks(rng.choice(files).text)
        start = rng.randrange(len(chunks))
        out: list[str] = []
        total = 0
        for chunk in chunks[start:]:
            if total + len(chunk) + 2 > limit or total >= target:
                break
            out.append(chunk)
            total += len(chunk) + 2
        if total >= target - 400 and len(out) >= 4 and not _digit_heavy(out):
            return out


# ---------------------------------------------------------------------------------------------------------------
# Families: how generated facts are written into each kind of text

Keep = Callable[[str], bool]
Haystack = Callable[[random.Random, Partition, int, int], list[str]]


@dataclass(frozen=True)
class Family:
    """A source of text and the way generated facts, variables and JSON are written into it."""

    name: str
    haystack: Haystack
    fact: Callable[[str], str]  # an English sentence as it appears in the text
    assign: Callable[[str, str], str]  # variable, number
    alias: Callable[[str, str], str]  # new variable, earlier variable
    var_question: str  # with {name}
    json_block: Callable[[str], str]  # an indented JSON object as it appears in the text
    size: Size

    def fits(self, context: str) -> bool:
        """Within the family's character bounds and not too dense in tokens."""
        return self.size.lo <= len(context) <= self.size.hi and estimated_tokens(context) <= MAX_EST_TOKENS


def _answer_instruction(kind: str) -> str:
    return {
        "number": "Answer with the number only.",
        "value": "Answer with the value only.",
        "option": "Answer with the option only.",
        "line": "Answer with that line of code only.",
    }[kind]


def _word_pairs(rng: random.Random, k: int) -> list[tuple[str, str]]:
    """k (adjective, noun) pairs in which no adjective and no noun repeats, so every key differs in both words."""
    return list(zip(rng.sample(ADJECTIVES, k), rng.sample(NOUNS, k), strict=True))


def _char_depth(blocks: list[str], depth: float) -> float:
    """The block-count depth (as `insert_at_depths` reads it) of the block boundary nearest `depth` of the text's
    characters: blocks differ in length (a heading, a long option list), so counting blocks would skew depths."""
    total = sum(len(b) + 2 for b in blocks)
    before = 0
    for i, b in enumerate(blocks):
        if before + (len(b) + 2) / 2 >= depth * total:
            return i / len(blocks)
        before += len(b) + 2
    return 1.0


def _with_facts(
    rng: random.Random, fam: Family, part: Partition, items: list[tuple[float, str]], avoid: Iterable[str]
) -> str | None:
    """The family's haystack with `items` inserted at their depths, or None if it is out of the size bounds or the
    real text already contains one of the generated names in `avoid`."""
    extra = sum(len(t) + 2 for _, t in items)
    blocks = fam.haystack(rng, part, fam.size.target - extra, fam.size.hi - extra)
    text = "\n\n".join(blocks)
    if any(a in text for a in avoid):
        return None
    context = insert_at_depths(blocks, [(_char_depth(blocks, d), t) for d, t in items])
    return context if fam.fits(context) else None


def build_needle(fam: Family, n: int, seed: int, part: Partition, keep: Keep) -> list[Instance]:
    """One access code ("The access code for the amber falcon vault is 640791.") at a stratified depth."""
    rng = random.Random(seed)
    task = f"{fam.name}_needle"
    out: list[Instance] = []
    while len(out) < n:
        (adj, noun), code = _word_pairs(rng, 1)[0], number(rng, 6)
        vault = f"{adj} {noun} vault"
        needle = fam.fact(f"The access code for the {vault} is {code}.")
        context = _with_facts(rng, fam, part, [(stratified_depth(rng, len(out), n), needle)], [vault, code])
        if context is None or not keep(context):
            continue
        question = f"What is the access code for the {vault}? {_answer_instruction('number')}"
        out.append(make_instance(task, len(out), context, question, [code], "substring", 32))
    return out


def build_multikey(fam: Family, n: int, seed: int, part: Partition, keep: Keep, keys: int = 6) -> list[Instance]:
    """Several serial numbers of named devices spread through the text; the question asks one (at a stratified
    depth). No two device names share a word, so the asked one is never a near-duplicate of a distractor."""
    rng = random.Random(seed)
    task = f"{fam.name}_multikey"
    out: list[Instance] = []
    while len(out) < n:
        names = [f"{a}-{b}" for a, b in _word_pairs(rng, keys)]
        values = distinct_items(rng, lambda r: number(r, 7), keys)
        asked = rng.randrange(keys)
        depths = [rng.uniform(0.02, 0.98) for _ in range(keys)]
        depths[asked] = stratified_depth(rng, len(out), n)
        needles = [fam.fact(f"The serial number of the {k} device is {v}.") for k, v in zip(names, values, strict=True)]
        context = _with_facts(rng, fam, part, list(zip(depths, needles, strict=True)), names + values)
        if context is None or not keep(context):
            continue
        question = f"What is the serial number of the {names[asked]} device? {_answer_instruction('number')}"
        out.append(make_instance(task, len(out), context, question, [values[asked]], "substring", 32))
    return out


def build_vartrack(
    fam: Family, n: int, seed: int, part: Partition, keep: Keep, chains: int = 2, hops: tuple[int, ...] = (1,)
) -> list[Instance]:
    """Chains of assignments (a number, then names equal to the previous name) spread through the text; instance i
    has hops[i % len(hops)] links per chain and asks the number at the end of one chain (the others distract).

    Two chains of one link each: with the suite's three chains of one or two links SmolLM2-135M's full cache
    answered 1 of 6 in man pages and 0 of 6 in C.
    """
    rng = random.Random(seed)
    task = f"{fam.name}_vartrack"
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out: list[Instance] = []
    while len(out) < n:
        h = hops[len(out) % len(hops)]
        names = distinct_items(rng, lambda r: "".join(r.choice(letters) for _ in range(5)), chains * (h + 1))
        values = distinct_items(rng, lambda r: number(r, 5), chains)
        items: list[tuple[float, str]] = []
        ends = []
        for c in range(chains):
            chain = names[c * (h + 1) : (c + 1) * (h + 1)]
            depths = sorted(rng.uniform(0.02, 0.98) for _ in chain)
            items.append((depths[0], fam.assign(chain[0], values[c])))
            items.extend((d, fam.alias(b, a)) for d, a, b in zip(depths[1:], chain, chain[1:], strict=False))
            ends.append(chain[-1])
        asked = rng.randrange(chains)
        context = _with_facts(rng, fam, part, items, names + values)
        if context is None or not keep(context):
            continue
        question = f"{fam.var_question.format(name=ends[asked])} {_answer_instruction('number')}"
        out.append(make_instance(task, len(out), context, question, [values[asked]], "substring", 32))
    return out


def json_object(rng: random.Random, entries: int) -> tuple[dict[str, int], str]:
    """A flat settings object of `entries` snake_case keys (no key shares a word with another) and 5-digit values;
    returns it and the key asked about."""
    keys = [f"{a}_{b}" for a, b in _word_pairs(rng, entries)]
    values = distinct_items(rng, lambda r: number(r, 5), entries)
    return dict(zip(keys, map(int, values), strict=True)), rng.choice(keys)


def build_json_lookup(
    fam: Family, n: int, seed: int, part: Partition, keep: Keep, entries: tuple[int, int] = (5, 8)
) -> list[Instance]:
    """A JSON settings object (5-8 entries) embedded at a stratified depth; the question asks one key's value.

    Small because SmolLM2-135M's full cache read none of 6 objects of 20-34 entries (and 2 of 6 at 5-7), while
    Qwen2.5-Coder-0.5B read 5 of 6 of the large ones: lists of similar key-value lines are what it confuses.
    """
    rng = random.Random(seed)
    task = f"{fam.name}_json_lookup"
    out: list[Instance] = []
    while len(out) < n:
        obj, asked = json_object(rng, rng.randint(*entries))
        block = fam.json_block(json.dumps(obj, indent=2))
        context = _with_facts(rng, fam, part, [(stratified_depth(rng, len(out), n), block)], list(obj))
        if context is None or not keep(context):
            continue
        question = f'In the JSON object above, what is the value of the key "{asked}"? {_answer_instruction("value")}'
        out.append(make_instance(task, len(out), context, question, [str(obj[asked])], "substring", 32))
    return out


_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*\w)")
# Options nearly every program has: a model can name them without reading the text.
_GENERIC_OPTIONS = frozenset({"help", "version", "usage", "verbose", "quiet", "debug"})


def _option_answers(item: ManBlock, others: list[ManBlock]) -> list[str]:
    """The item's option spellings of 4+ characters that occur in no other item's tag, longest first; none for an
    option every program has (--help, --version, ...)."""
    found = _OPTION.findall(item.tag)
    if any(o.lstrip("-").lower() in _GENERIC_OPTIONS for o in found):
        return []
    tags = "\0".join(o.tag for o in others)
    names = dict.fromkeys(o for o in found if len(o) >= 4 and o not in tags)
    return sorted(names, key=len, reverse=True)


_ABBREVIATION = re.compile(r"(?:[A-Za-z]\.){2,}|etc\.|cf\.|vs\.|[A-Z]\.", re.I)


def _description_phrase(item: ManBlock, answers: list[str], flat: str) -> str | None:
    """The first 4-10 words of the item's description (up to its first full stop), if they occur once in `flat`."""
    words = []
    for w in item.text.split():
        words.append(w)
        if (w.endswith(".") and not _ABBREVIATION.fullmatch(w)) or len(words) == 10:
            break
    phrase = " ".join(words).rstrip(".,;:")
    if len(phrase.split()) < 4 or '"' in phrase or any(a in phrase for a in answers):
        return None
    return phrase if flat.count(phrase) == 1 else None


def _option_candidates(blocks: list[ManBlock], flat: str) -> list[tuple[list[str], str]]:
    """(answers, quoted phrase) for every option item of `blocks` that a question can be asked about."""
    items = [b for b in blocks if b.kind == "item" and b.tag.startswith("-")]
    out = []
    for item in items:
        answers = _option_answers(item, [b for b in items if b is not item])
        phrase = _description_phrase(item, answers, flat) if answers else None
        if phrase:
            out.append((answers, phrase))
    return out


def option_statement(phrase: str, option: str) -> str:
    return f'The option described as "{phrase}" is {option}.'


def build_option(fam: Family, n: int, seed: int, part: Partition, keep: Keep, statements: int = 2) -> list[Instance]:
    """Man-page text with option lists; quote the start of one option's description and ask for the option.

    Asked options are real ones whose spellings occur in no other option tag of the context (so substring scoring
    cannot credit a neighbour) and whose quoted words occur once. SmolLM2-135M cannot read an option off the real
    list (0 of 6 with the full cache: it would have to look back from the description to the tag), so `statements`
    real options of the context are also restated as sentences ('The option described as "..." is --x.'), the
    asked one at a stratified depth and the other as a distractor; the real entries stay in the text (3 of 6 right
    with three such sentences).
    """
    rng = random.Random(seed)
    task = f"{fam.name}_option"
    reserve = 150 * statements
    out: list[Instance] = []
    while len(out) < n:
        blocks = man_blocks(rng, part, fam.size.target - reserve, fam.size.hi - reserve)
        texts = [b.render() for b in blocks]
        candidates = _option_candidates(blocks, " ".join("\n\n".join(texts).split()))
        if len(candidates) < statements:
            continue
        chosen = rng.sample(candidates, statements)
        depths = [stratified_depth(rng, len(out), n)] + [rng.uniform(0.02, 0.98) for _ in range(statements - 1)]
        items = [
            (_char_depth(texts, d), option_statement(phrase, answers[0]))
            for d, (answers, phrase) in zip(depths, chosen, strict=True)
        ]
        context = insert_at_depths(texts, items)
        if not fam.fits(context) or not keep(context):
            continue
        answers, phrase = chosen[0]
        question = f'Which option is described as "{phrase}"? {_answer_instruction("option")}'
        out.append(make_instance(task, len(out), context, question, answers, "substring", 32))
    return out


def build_nextline(fam: Family, n: int, seed: int, part: Partition, keep: Keep) -> list[Instance]:
    """Next-line completion on a real C header (edit similarity), as the suite's code_completion for Python: the
    target line is not in the context but a similar line is (a sibling declaration, a parallel #define)."""
    rng = random.Random(seed)
    task = f"{fam.name}_nextline"
    files = [f for f in c_files(part) if len(f.text) >= fam.size.target + 2000]
    out: list[Instance] = []
    order: list[CFile] = []
    while len(out) < n:
        if not order:
            order = rng.sample(files, len(files))
        lines = order.pop().lines
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line) + 1)
        targets = [t for t in c_completion_targets(lines) if offsets[t] >= fam.size.target]
        rng.shuffle(targets)
        for t in targets[:40]:
            context = code_window(lines, t, fam.size)
            target = lines[t].strip()
            if (
                context is not None
                and target not in context
                and fam.fits(context)
                and keep(context)
                and similar_lines(target, context.splitlines(), 1, 0.6)
            ):
                break
        else:
            continue
        question = f"Continue the C code above: write its next line. {_answer_instruction('line')}"
        out.append(make_instance(task, len(out), context, question, [target], "edit_sim", 48))
    return out


Builder = Callable[[Family, int, int, Partition, Keep], list[Instance]]

MANPAGES = Family(
    name="manpages",
    haystack=man_haystack,
    fact=lambda s: s,
    assign=lambda a, v: f"The value of variable {a} is {v}.",
    alias=lambda b, a: f"The value of variable {b} is the same as the value of variable {a}.",
    var_question="What is the value of variable {name}?",
    json_block=lambda j: f"EXAMPLE SETTINGS\n{j}",
    size=MAN_SIZE,
)
CSOURCE = Family(
    name="csource",
    haystack=c_haystack,
    fact=lambda s: f"/* {s} */",
    # As comments in words: written as #define chains, SmolLM2-135M's full cache followed none of 6 (1 of 6 so).
    assign=lambda a, v: f"/* The value of variable {a} is {v}. */",
    alias=lambda b, a: f"/* The value of variable {b} is the same as the value of variable {a}. */",
    var_question="What is the value of variable {name}?",
    json_block=lambda j: f"/* Default settings, as JSON:\n{j}\n*/",
    size=C_SIZE,
)
FAMILIES = {f.name: f for f in (MANPAGES, CSOURCE)}
SHARED_KINDS: dict[str, Builder] = {
    "needle": build_needle,
    "multikey": build_multikey,
    "vartrack": build_vartrack,
    "json_lookup": build_json_lookup,
}
OWN_KIND: dict[str, tuple[str, Builder]] = {
    "manpages": ("option", build_option),
    "csource": ("nextline", build_nextline),
}


def kinds(family: str) -> dict[str, Builder]:
    """The family's task kinds in build order (kind k uses seed + 1 + k)."""
    own, builder = OWN_KIND[family]
    return {**SHARED_KINDS, own: builder}


def sources_available(family: str) -> bool:
    """True if this machine has the family's source texts."""
    if family == "manpages":
        return any((MAN_DIR / s).glob("*.gz") for s in MAN_SECTIONS)
    return INCLUDE_DIR.is_dir() and any(INCLUDE_DIR.glob("*.h"))


# ---------------------------------------------------------------------------------------------------------------
# Building: evaluation instances, calibration samples, disjointness


def reference_text(paths: Iterable[Path]) -> str:
    """Contexts and questions of every JSONL file in `paths` (files, or directories of *.jsonl), joined by NULs."""
    parts: list[str] = []
    for path in paths:
        for f in sorted(path.glob("*.jsonl")) if path.is_dir() else [path]:
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    parts += [row["context"], row["question"]]
    return "\0".join(parts)


def shipped_reference() -> str:
    """The shipped suite and calibration set, which a family's text must not quote."""
    return reference_text([default_suite_path(), default_data_path()])


def disjoint_from(reference: str) -> Keep:
    """A filter keeping contexts that share no 200-character passage with `reference` (see `shares_text`)."""
    return lambda context: not shares_text(context, reference)


def build_eval(
    family: str, n: int = DEFAULT_N, seed: int = DEFAULT_SEED, reference: str | None = None
) -> dict[str, list[Instance]]:
    """task name -> n evaluation instances from the evaluation partition; kind k uses seed + 1 + k."""
    keep = disjoint_from(shipped_reference() if reference is None else reference)
    fam = FAMILIES[family]
    return {
        f"{family}_{kind}": builder(fam, n, seed + 1 + k, EVALUATION, keep)
        for k, (kind, builder) in enumerate(kinds(family).items())
    }


def _calibration_row(row: Instance, kind: str, i: int) -> Instance:
    return {
        "id": f"{row['task']}-{i:02d}",
        "category": kind,
        "context": row["context"],
        "question": row["question"],
        "answers": [row["answers"][0]],
    }  # type: ignore[index]


def build_calibration(
    family: str,
    n: int = DEFAULT_CALIBRATION_N,
    seed: int = DEFAULT_SEED,
    eval_rows: Iterable[Instance] = (),
    reference: str | None = None,
) -> list[Instance]:
    """n calibration-format samples from the calibration partition, round-robin over the kinds (categories).

    Kind k uses seed + 501 + k; a sample sharing a 200-character passage with `eval_rows` or the shipped data is
    skipped. Answers are the bare first reference (calibration teacher-forces answers[0]).
    """
    base = shipped_reference() if reference is None else reference
    keep = disjoint_from("\0".join([base, *(str(r["context"]) for r in eval_rows)]))
    fam = FAMILIES[family]
    table = kinds(family)
    counts = [n // len(table) + (1 if k < n % len(table) else 0) for k in range(len(table))]
    per_kind = [
        [
            _calibration_row(r, kind, i)
            for i, r in enumerate(builder(fam, c, seed + 1 + CALIBRATION_SEED_OFFSET + k, CALIBRATION, keep))
        ]
        for k, ((kind, builder), c) in enumerate(zip(table.items(), counts, strict=True))
    ]
    return [rows[d] for d in range(max(counts)) for rows in per_kind if d < len(rows)]


def command_line(family: str, n: int, seed: int, out: bool, calibration_n: int | None) -> str:
    """The CLI command that rebuilds these files (DIR and FILE stand for the output paths)."""
    command = f"python -m polykv.evaluate.suite.families --family {family}"
    if out:
        command += " --out DIR"
    command += f" --n {n} --seed {seed}"
    if calibration_n is not None:
        command += f" --calibration-out FILE --calibration-n {calibration_n}"
    return command


def write_eval(
    out: Path, family: str, tasks: dict[str, list[Instance]], n: int, seed: int, calibration_n: int | None
) -> dict:
    """Write DIR/<task>.jsonl and DIR/manifest.json; returns the manifest."""
    manifest: dict = {
        "builder_version": FAMILY_BUILDER_VERSION,
        "family": family,
        "seed": seed,
        "partition": EVALUATION.name,
        "python": sys.version.split()[0],
        "command": command_line(family, n, seed, True, calibration_n),
        "tasks": {},
    }
    for k, (name, rows) in enumerate(tasks.items()):
        write_jsonl(out / f"{name}.jsonl", rows)
        manifest["tasks"][name] = {"seed": seed + 1 + k, "metric": rows[0]["metric"], **length_stats(rows)}
        print(f"{name}: {json.dumps(manifest['tasks'][name])}", file=sys.stderr)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(FAMILIES), required=True)
    ap.add_argument("--out", type=Path, help="directory for the evaluation <task>.jsonl files and manifest.json")
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="evaluation instances per task")
    ap.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"base seed (kind k: seed + 1 + k; calibration seed + {CALIBRATION_SEED_OFFSET + 1} + k)",
    )
    ap.add_argument(
        "--calibration-out",
        type=Path,
        help="calibration-format JSONL (disjoint from the evaluation instances built with the same --n and --seed)",
    )
    ap.add_argument("--calibration-n", type=int, default=DEFAULT_CALIBRATION_N, help="calibration samples")
    args = ap.parse_args(argv)
    if args.out is None and args.calibration_out is None:
        ap.error("give --out, --calibration-out or both")
    if not sources_available(args.family):
        ap.error(f"this machine has no {args.family} sources ({MAN_DIR} or {INCLUDE_DIR})")
    calibration_n = args.calibration_n if args.calibration_out else None
    reference = shipped_reference()
    tasks = build_eval(args.family, args.n, args.seed, reference)
    if args.out is not None:
        write_eval(args.out, args.family, tasks, args.n, args.seed, calibration_n)
    if args.calibration_out is not None:
        rows = build_calibration(
            args.family, args.calibration_n, args.seed, [r for rs in tasks.values() for r in rs], reference
        )
        write_jsonl(args.calibration_out, rows)
        chars = [len(str(r["context"])) for r in rows]
        print(f"calibration: {len(rows)} samples, {min(chars)}-{max(chars)} chars", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
