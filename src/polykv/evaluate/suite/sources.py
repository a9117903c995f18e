"""Offline text sources for the shipped data, split into two disjoint partitions.

The calibration set and the evaluation suite are built from the same kinds of text but never the same text:
the *calibration* partition uses standard-library modules whose names start with a-m, Debian changelogs of
source packages a-m and one group of license texts; the *evaluation* partition uses modules n-z, changelogs n-z
and the other licenses. All sources exist on any Debian machine with Python; their exact contents vary with the
Python and Debian versions, which is why the built JSONL files are shipped and the builders only regenerate them.
"""

from __future__ import annotations

import ast
import gzip
import inspect
import random
import re
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

LICENSE_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")
CHARS_PER_TOKEN = 3.5  # the token estimate used for context sizes: characters / 3.5

# Stdlib parts that are generated tables, tests, demos or jokes rather than ordinary code and prose.
_SKIP_STDLIB = {
    "test",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "lib-dynload",
    "pydoc_data",
    "encodings",
    "ensurepip",
    "this.py",
    "antigravity.py",
    "__pycache__",
}


@dataclass(frozen=True)
class Partition:
    """Which sources a data set may use: a first-letter range for module/package names, and license files."""

    name: str
    first: str
    last: str
    licenses: tuple[str, ...]

    def owns(self, name: str) -> bool:
        """True if `name` (a module or Debian source package) belongs to this partition."""
        return bool(name) and self.first <= name[0].lower() <= self.last


# The GNU licenses share long paragraphs (GFDL-1.3 reuses GPL-3's termination clause), so all stay on one side.
CALIBRATION = Partition("calibration", "a", "m", ("Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0"))
EVALUATION = Partition("evaluation", "n", "z", ("GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3", "GFDL-1.3", "MPL-1.1"))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class SourceFile:
    """One standard-library Python file: its dotted module name, its text and its parsed tree."""

    module: str
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @property
    def tree(self) -> ast.Module:
        return _parse(self.text)


@cache
def _parse(text: str) -> ast.Module:
    return ast.parse(text)


@cache
def python_files(part: Partition) -> tuple[SourceFile, ...]:
    """The partition's stdlib .py files (top-level modules and package members), in sorted path order."""
    root = stdlib_dir()
    out: list[SourceFile] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        top = rel.parts[0]
        if top in _SKIP_STDLIB or any(p in _SKIP_STDLIB or p.startswith("test") for p in rel.parts[:-1]):
            continue
        if top.startswith("_") or not part.owns(top) or top.startswith("config-"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            _parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out.append(SourceFile(module, text))
    return tuple(out)


@cache
def license_text(name: str) -> str:
    """A license file from /usr/share/common-licenses, with form feeds removed."""
    return (LICENSE_DIR / name).read_text(encoding="utf-8", errors="replace").replace("\f", "")


@dataclass(frozen=True)
class Docstring:
    """A documented module, class or function: `name` is its qualified name, `short` the last component."""

    name: str
    short: str
    text: str


@cache
def docstrings(part: Partition) -> tuple[Docstring, ...]:
    """Cleaned docstrings of the partition's modules, classes and public functions, in file order."""
    out: list[Docstring] = []
    for f in python_files(part):
        doc = ast.get_docstring(f.tree)
        if doc:
            out.append(Docstring(f.module, f.module.rsplit(".", 1)[-1], inspect.cleandoc(doc)))

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if child.name.startswith("_"):
                        continue
                    name = f"{prefix}.{child.name}"
                    d = ast.get_docstring(child)
                    if d:
                        out.append(Docstring(name, child.name, inspect.cleandoc(d)))
                    if isinstance(child, ast.ClassDef):
                        walk(child, name)

        walk(f.tree, f.module)
    return tuple(out)


@dataclass(frozen=True)
class ChangelogEntry:
    """One Debian changelog entry: its full text and the fields questions are asked about."""

    source: str
    version: str
    signer: str
    date: str  # "12 Jun 2023"
    text: str


_HEADER = re.compile(r"^([a-z0-9][a-z0-9+.\-]*) \(([^)\s]+)\) [^;\n]*;[^\n]*$", re.M)
_TRAILER = re.compile(r"^ -- (.+?) <[^>\n]*>  \w{3}, +(\d{1,2} \w{3} \d{4}) [^\n]*$", re.M)


def parse_changelog(text: str) -> list[ChangelogEntry]:
    """Entries that have a parseable header and sign-off line; others are dropped."""
    starts = [m.start() for m in _HEADER.finditer(text)] + [len(text)]
    entries = []
    for a, b in zip(starts, starts[1:], strict=False):
        chunk = text[a:b].strip("\n")
        head = _HEADER.match(chunk)
        tail = _TRAILER.search(chunk)
        if head and tail and tail.end() >= len(chunk.rstrip()) - 1:
            entries.append(ChangelogEntry(head.group(1), head.group(2), tail.group(1).strip(), tail.group(2), chunk))
    return entries


@cache
def changelogs(part: Partition) -> tuple[tuple[ChangelogEntry, ...], ...]:
    """Debian changelogs of the partition's source packages (one per source package), sorted by source name."""
    seen: dict[str, tuple[ChangelogEntry, ...]] = {}
    for path in sorted(DOC_DIR.glob("*/changelog.Debian.gz")):
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        entries = parse_changelog(text)
        if len(entries) < 3:
            continue
        source = entries[0].source
        if part.owns(source) and len(entries) > len(seen.get(source, ())):
            seen[source] = tuple(entries)
    return tuple(seen[k] for k in sorted(seen))


def paragraphs(text: str, min_chars: int = 80, max_chars: int = 1500) -> list[str]:
    """Blank-line separated paragraphs of reasonable size, whitespace-trimmed."""
    out = []
    for p in re.split(r"\n\s*\n", text):
        p = p.strip("\n").rstrip()
        if min_chars <= len(p.strip()) <= max_chars:
            out.append(p)
    return out


@cache
def prose_pool(part: Partition) -> tuple[str, ...]:
    """Prose paragraphs for haystacks: the partition's licenses and its longer module docstrings."""
    pool: list[str] = []
    for name in part.licenses:
        pool.extend(paragraphs(license_text(name)))
    for d in docstrings(part):
        if "." not in d.name and len(d.text) > 400 and ">>>" not in d.text:
            pool.extend(paragraphs(d.text))
    # Exact repeats (shared boilerplate) would make needles ambiguous with their surroundings; keep the first.
    return tuple(dict.fromkeys(pool))


def haystack(rng: random.Random, part: Partition, target: int, limit: int) -> list[str]:
    """Random prose paragraphs (no repeats) totalling at least `target` and at most `limit` characters."""
    pool = list(prose_pool(part))
    rng.shuffle(pool)
    out: list[str] = []
    total = 0
    for p in pool:
        if total >= target:
            break
        if total + len(p) + 2 <= limit:
            out.append(p)
            total += len(p) + 2
    return out


def insert_at_depths(blocks: list[str], items: list[tuple[float, str]]) -> str:
    """Join `blocks` with blank lines, inserting each (depth in [0, 1], text) between blocks at that depth."""
    slots: dict[int, list[str]] = {}
    for depth, text in sorted(items, key=lambda x: x[0]):
        i = min(len(blocks), max(0, round(depth * len(blocks))))
        slots.setdefault(i, []).append(text)
    out: list[str] = []
    for i in range(len(blocks) + 1):
        out.extend(slots.get(i, []))
        if i < len(blocks):
            out.append(blocks[i])
    return "\n\n".join(out)


# Small word lists for generated keys and names (synthetic, not taken from any data set).
FIRST_NAMES = (
    "Alice",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hiroshi",
    "Ingrid",
    "Jamal",
    "Katarina",
    "Lionel",
    "Mariko",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Stefan",
    "Tamara",
    "Ulrich",
    "Valeria",
    "Wendell",
    "Ximena",
    "Yusuf",
    "Zofia",
    "Anders",
    "Beatriz",
    "Cyrus",
    "Dalia",
    "Emeka",
    "Fiona",
    "Gustavo",
    "Helga",
    "Ivan",
    "Jolene",
    "Kwame",
    "Leila",
    "Mateo",
    "Noor",
    "Odette",
    "Pavel",
    "Renata",
    "Soren",
    "Thea",
)
LAST_NAMES = (
    "Abernathy",
    "Brandt",
    "Castellano",
    "Dufresne",
    "Eriksen",
    "Fontaine",
    "Galloway",
    "Haddad",
    "Ishikawa",
    "Jankowski",
    "Kowalczyk",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okonkwo",
    "Petrov",
    "Quintero",
    "Rasmussen",
    "Salazar",
    "Thorsen",
    "Umarov",
    "Vasquez",
    "Whitfield",
    "Yamamoto",
    "Zielinski",
    "Ferreira",
    "Holloway",
)
ADJECTIVES = (
    "amber",
    "brisk",
    "candid",
    "dusky",
    "eager",
    "frosty",
    "gentle",
    "hollow",
    "ivory",
    "jolly",
    "keen",
    "lively",
    "mellow",
    "nimble",
    "opal",
    "proud",
    "quiet",
    "rustic",
    "silver",
    "tidal",
    "upper",
    "velvet",
    "windy",
    "young",
    "zesty",
    "bold",
    "crimson",
    "distant",
    "early",
    "fuzzy",
    "golden",
    "humble",
    "icy",
    "lunar",
    "misty",
    "noble",
)
NOUNS = (
    "anchor",
    "badger",
    "canyon",
    "dolphin",
    "ember",
    "falcon",
    "glacier",
    "harbor",
    "island",
    "jaguar",
    "kettle",
    "lantern",
    "meadow",
    "nebula",
    "orchard",
    "pebble",
    "quarry",
    "river",
    "saddle",
    "thistle",
    "valley",
    "walnut",
    "willow",
    "yonder",
    "beacon",
    "cobalt",
    "dune",
    "fern",
    "grove",
    "heron",
    "lagoon",
    "maple",
    "otter",
    "prism",
)


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def key_phrase(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def shares_text(text: str, reference: str, window: int = 200, step: int = 50) -> bool:
    """True if some `window`-character stretch of `text` (taken every `step` characters) occurs in `reference`.

    Catches any shared passage of `window + step` characters or more; used to keep calibration and evaluation
    texts disjoint even where the sources quote each other (copied code, shared license clauses).
    """
    return any(text[o : o + window] in reference for o in range(0, max(1, len(text) - window + 1), step))
