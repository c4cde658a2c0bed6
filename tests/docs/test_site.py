"""The site builds with ``mkdocs build --strict`` (broken links, missing pages and
mkdocstrings errors fail it), and the docs' worked examples hold."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.campaigns import Campaign
from tests.conftest import subprocess_env
from tests.docs.blocks import ROOT, blocks, pages


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=subprocess_env(NO_MKDOCS_2_WARNING="1"), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    site = tmp_path / "site"
    for page in ("maintenance", "troubleshooting", "migrating", "client"):
        assert (site / page / "index.html").exists(), page
    assert "register_campaign" in (site / "client" / "index.html").read_text()


PYCON_PAGES = [p for p in pages() if any(b.lang == "pycon" for b, _ in blocks(p))]


@pytest.mark.parametrize("page", PYCON_PAGES, ids=[p.name for p in PYCON_PAGES])
def test_pycon_examples(page: Path) -> None:
    """``pycon`` blocks run as doctests, in one namespace per page."""
    text = "\n".join("\n".join(b.body) for b, _ in blocks(page) if b.lang == "pycon")
    test = doctest.DocTestParser().get_doctest(text, {}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    out: list[str] = []
    result = runner.run(test, out=out.append)
    assert result.attempted > 0
    assert result.failed == 0, "".join(out)


def test_campaign_definitions_in_the_docs_are_valid() -> None:
    checked = 0
    for page in pages():
        for block, _ in blocks(page):
            if block.lang != "json":
                continue
            text = "\n".join(block.body)
            if '"entry"' not in text:
                continue
            Campaign.model_validate(json.loads(text))
            checked += 1
    for path in sorted((ROOT / "docs" / "examples").glob("*.json")):
        Campaign.model_validate(json.loads(path.read_text()))
        checked += 1
    assert checked >= 5
