"""JSON job serialization for arq (never pickle: whoever writes to Redis could run code)."""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["dumps", "job_payload", "loads"]


def dumps(obj: Any) -> bytes:
    """Serialize a job or result; tuples become lists, unknown types become their ``str``."""
    return orjson.dumps(obj, default=str)


def loads(data: bytes) -> Any:
    """Deserialize a job; raises on anything that is not JSON (arq then treats it as poison)."""
    return orjson.loads(data)


def job_payload(
    function: str,
    args: list[Any],
    kwargs: dict[str, Any],
    enqueue_ms: int,
    job_try: int | None = None,
) -> bytes:
    """The bytes arq's worker expects under ``arq:job:<id>`` (see ``arq.jobs.serialize_job``)."""
    return orjson.dumps({"t": job_try, "f": function, "a": args, "k": kwargs, "et": enqueue_ms})
