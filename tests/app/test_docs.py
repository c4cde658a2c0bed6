"""The README says what the code does: its settings table is generated from Settings."""

from __future__ import annotations

import re
import runpy

from tests.conftest import ROOT


def test_readme_settings_table_matches_the_code() -> None:
    generated = runpy.run_path(str(ROOT / "scripts" / "settings_table.py"))["rows"]()
    readme = ROOT.joinpath("README.md").read_text().splitlines()
    table = [
        line
        for line in readme
        if line.startswith(("| `REDIS_URL`", "| `SENTRY_DSN`", "| `CAMPAIGN_"))
    ]
    assert table == generated, (
        "README settings table is out of date: run .venv/bin/python scripts/settings_table.py"
    )


def test_readme_links_resolve() -> None:
    """The README is the front page of docs/: every relative link it makes exists."""
    readme = ROOT.joinpath("README.md").read_text()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)#:]+(?:#[^)]*)?)\)", readme)}
    assert any(t.startswith("docs/") for t in targets)
    missing = sorted(t for t in targets if not (ROOT / t).exists())
    assert not missing, missing
