"""docs/ names everything a user can set, scrape, be paged by, or type: every setting,
metric, alert and ``campaign-worker`` subcommand; the settings tables are the code's."""

from __future__ import annotations

import argparse
import runpy

import pytest
import yaml

from app.settings import Settings
from tests.docs.blocks import ROOT
from worker.cli import _parser
from worker.metrics import REGISTRY

DOCS = ROOT / "docs"


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))


def _settings_rows() -> list[str]:
    return list(runpy.run_path(str(ROOT / "scripts" / "settings_table.py"))["rows"]())


def _env_name(field: str) -> str:
    return field.upper() if field in {"redis_url", "sentry_dsn"} else f"CAMPAIGN_{field.upper()}"


def _table_rows(path: str) -> list[str]:
    names = {_env_name(f) for f in Settings.model_fields}
    return [
        line
        for line in (ROOT / path).read_text().splitlines()
        if line.startswith("| `") and line.split("`")[1] in names
    ]


@pytest.mark.parametrize("path", ["docs/settings.md", "README.md"])
def test_settings_table_is_generated_from_the_code(path: str) -> None:
    assert _table_rows(path) == _settings_rows(), (
        f"{path}: the settings table is out of date; paste the rows of "
        ".venv/bin/python scripts/settings_table.py"
    )


def test_every_setting_is_documented() -> None:
    text = _docs_text()
    missing = [_env_name(f) for f in Settings.model_fields if f"`{_env_name(f)}`" not in text]
    assert not missing, missing


def test_every_metric_is_documented() -> None:
    text = _docs_text()
    names = {m.name for m in REGISTRY.collect()}
    # Counters are collected without their `_total` suffix.
    documented = {n if f"`{n}" in text else n + "_total" for n in names}
    missing = sorted(n for n in documented if f"`{n}" not in text)
    assert len(names) >= 15
    assert not missing, missing


def _alerts() -> list[str]:
    found = []
    for path in sorted((ROOT / "deploy" / "prometheus").glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for group in doc.get("groups", []) if isinstance(doc, dict) else []:
            found += [r["alert"] for r in group.get("rules", []) if "alert" in r]
    return found


def test_every_alert_has_a_troubleshooting_entry() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    alerts = _alerts()
    assert len(alerts) >= 8
    missing = [a for a in alerts if f"### {a}\n" not in text]
    assert not missing, f"no '### NAME' section in docs/troubleshooting.md for {missing}"


def test_every_cli_subcommand_is_documented() -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = _docs_text()
    missing = [name for name in sub.choices if f"campaign-worker {name}" not in text]
    assert len(sub.choices) >= 15
    assert not missing, missing
    for flag in ("--version", "--redis-url"):
        assert flag in text
