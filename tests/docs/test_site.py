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


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``mkdocs build --strict`` into a temporary directory: (the run, the site)."""
    site = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=subprocess_env(NO_MKDOCS_2_WARNING="1"), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    return done, site


def test_mkdocs_build_strict(built: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, site = built
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for page in ("maintenance", "troubleshooting", "migrating", "client"):
        assert (site / page / "index.html").exists(), page
    assert "register_campaign" in (site / "client" / "index.html").read_text()


def test_api_reference_cites_no_file_readers_lack(
    built: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Readers have the repository, not the project's shared folder: the API reference is
    generated from docstrings, which must not send them to a PRODUCT.md they do not have."""
    done, site = built
    assert done.returncode == 0
    mentions = sorted(
        str(p.relative_to(site)) for p in site.rglob("*.html") if "PRODUCT.md" in p.read_text()
    )
    assert not mentions, f"pages that cite PRODUCT.md (from app/ docstrings): {mentions}"


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
