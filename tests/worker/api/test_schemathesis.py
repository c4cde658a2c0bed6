"""Schemathesis over /openapi.json: generated calls (from the schema, then stateful ones
following its links) against a real ``campaign-worker api`` and Redis. No server error,
and every response (status, content type, headers, body) must match the document."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from app.settings import Settings
from tests.campaigns import reply_timeout
from tests.conftest import subprocess_env
from tests.fake_service import FakeService
from tests.worker.api.conftest import RW, ApiProcess

CONFIG = Path(__file__).with_name("schemathesis.toml")


async def test_schemathesis_finds_no_server_error_and_no_mismatch(
    settings: Settings, client: object, svc: FakeService, tmp_path: Path
) -> None:
    del client  # (it empties the private Redis)
    api = await ApiProcess(settings.redis_url.get_secret_value()).start()
    try:
        assert (await api.call("POST", "/v1/campaigns", reply_timeout(svc))).status == 201
        enrolled = await api.call("POST", "/v1/campaigns/rt/enrollments", {"contact_id": "c1"})
        assert enrolled.status == 201
        report = tmp_path / "report"
        done = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(CONFIG),
             "run", api.base + "/openapi.json", "-H", f"Authorization: Bearer {RW}",
             "--max-examples", os.environ.get("ST_MAX_EXAMPLES", "40"), "--workers", "2",
             "--seed", os.environ.get("ST_SEED", "20261201"), "--report", "junit",
             "--report-dir", str(report), "--no-color"],
            env=subprocess_env(ST_CAMPAIGN_ID="rt", ST_ENROLLMENT_ID="rt:c1"),
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        tail = done.stdout[-6000:] + done.stderr[-2000:]
        assert done.returncode == 0, tail
        assert "Tested: 14" in done.stdout, tail
        # the stateful phase followed the document's links (register -> enroll -> status...)
        links = re.search(r"API Links:\s+(\d+) covered", done.stdout)
        assert links is not None and int(links.group(1)) >= 2, tail
    finally:
        assert api.stop() == 0
