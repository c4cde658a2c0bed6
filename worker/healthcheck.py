"""``python -m worker.healthcheck``: the image's HEALTHCHECK (the slim image has no curl).

Exit 0 when this container's process answers ``/livez``: the worker's server on
``CAMPAIGN_HTTP_PORT`` (8080) or the control API on ``CAMPAIGN_API_PORT`` (8000), since
one image runs either. Liveness only: never Redis, which is ``/readyz``'s job.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping

__all__ = ["alive", "main"]

#: What is probed: the environment variable of each port, and its default.
PORTS = (("CAMPAIGN_HTTP_PORT", "8080"), ("CAMPAIGN_API_PORT", "8000"))


def alive(env: Mapping[str, str] = os.environ, timeout: float = 2.0) -> bool:
    """Whether ``/livez`` answers 2xx on one of the ports."""
    # no proxy: HTTP_PROXY in the container's environment must not route loopback away
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for variable, default in PORTS:
        url = f"http://127.0.0.1:{env.get(variable) or default}/livez"
        try:
            with opener.open(url, timeout=timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


def main() -> int:
    return 0 if alive() else 1


if __name__ == "__main__":
    sys.exit(main())
