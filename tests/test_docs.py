"""README.md, .ci/run and the docs site agree: CI runs the README's commands, every page is
in the site's navigation, and the README's links point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in lines]
    return [re.sub(r"\s-q\b", "", c) for c in commands if c]


def _readme_command(marker: str) -> list[str]:
    """The README's one-line shell command that contains `marker`, split at `&&`."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("python -m venv") and marker in line:
            return [re.sub(r"\s-q\b", "", part).strip() for part in line.split("&&")]
    raise AssertionError(f"README.md has no one-line command containing {marker!r}")


def test_ci_runs_the_readme_test_command():
    ci = _ci_commands()
    readme = _readme_command("pytest")
    skipped = {"python -m venv .venv", ". .venv/bin/activate"}  # CI makes its own venv
    missing = [part for part in readme if part not in skipped and part not in ci]
    assert not missing, f".ci/run does not run these commands of README.md: {missing}"


def test_every_docs_page_is_in_the_navigation():
    yml = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", yml, flags=re.MULTILINE))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert nav <= pages, f"mkdocs.yml names missing pages: {sorted(nav - pages)}"
    assert pages <= nav, f"pages not in mkdocs.yml's nav: {sorted(pages - nav)}"


@pytest.mark.parametrize("doc", ["README.md", "BENCHMARKS.md"])
def test_relative_links_exist(doc):
    text = (ROOT / doc).read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"{doc} links to files that do not exist: {missing}"
