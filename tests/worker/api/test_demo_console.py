"""``campaign-worker demo --console``: a newcomer sees the console at once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp

from tests.conftest import subprocess_env
from tests.helpers import eventually
from worker.embedded_redis import free_port


async def test_demo_with_the_console_serves_it_until_interrupted() -> None:
    port = free_port()
    exe = Path(sys.executable).parent / "campaign-worker"
    proc = subprocess.Popen([str(exe), "demo", "--contacts", "30", "--console"],
                            env=subprocess_env(CAMPAIGN_API_PORT=str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(line.rstrip("\n") for line in proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:

        async def said(pattern: str) -> re.Match[str] | None:
            return next((m for line in lines if (m := re.search(pattern, line))), None)

        found = await eventually(lambda: said(r"console: (\S+) \(log in with this run's token: (\S+)\)"),
                                 60, 0.05, "the console line")  # fmt: skip
        url, token = found.group(1), found.group(2)
        assert url == f"http://127.0.0.1:{port}/ui/"
        await eventually(lambda: said("keeps serving"), 120, 0.1, "the summary")
        assert any("result: OK" in line for line in lines), lines[-20:]
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "login", data={"token": token}, allow_redirects=False) as r:
                assert r.status == 303, await r.text()
                session = r.cookies["campaign_session"].value
            # (the cookie is Secure: aiohttp's jar keeps it for https only, so it is sent by hand)
            async with s.get(url, headers={"Cookie": f"campaign_session={session}"}) as r:
                page = await r.text()
                assert r.status == 200 and "demo-onboarding" in page, page[:500]
            async with s.get(f"http://127.0.0.1:{port}/v1/queue",
                             headers={"Authorization": f"Bearer {token}"}) as r:  # fmt: skip
                assert (await r.json())["campaigns"][0]["counts"]["completed"] == 30
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(5)
