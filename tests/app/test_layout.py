"""The library the API imports stays free of worker code."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_importing_the_client_loads_no_worker_module() -> None:
    code = "import sys, app; from app import CampaignClient; print(sorted(m for m in sys.modules if m.split('.')[0] in ('worker', 'arq.worker', 'aiohttp.web')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_app_sources_never_import_worker() -> None:
    for path in (ROOT / "app").rglob("*.py"):
        text = path.read_text()
        assert "from worker" not in text and "import worker" not in text, path
