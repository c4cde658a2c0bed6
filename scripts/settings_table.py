"""Print the README's settings table from ``app.settings.Settings`` (the source of truth).

    .venv/bin/python scripts/settings_table.py

``tests/app/test_docs.py`` checks that README.md holds exactly these rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datetime import timedelta

from pydantic import SecretStr

from app.durations import format_duration
from app.settings import Settings


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    if field in {"redis_url", "sentry_dsn"}:
        return field.upper()
    return f"CAMPAIGN_{field.upper()}"


def rows() -> list[str]:
    """One Markdown table row per setting: variable, default, meaning."""
    out = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if isinstance(default, timedelta):
            default = format_duration(default)
        shown = "(unset)" if default is None else "(empty)" if default == "" else f"`{default}`"
        meaning = (field.description or "").replace("|", "\\|")
        out.append(f"| `{env_name(name)}` | {shown} | {meaning} |")
    return out


if __name__ == "__main__":
    print("| variable | default | meaning |")
    print("|---|---|---|")
    print("\n".join(rows()))
