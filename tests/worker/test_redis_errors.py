"""What counts as a Redis fault (pause and retry) rather than a step's own failure."""

from __future__ import annotations

import pytest
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError

from worker.redis_errors import is_redis_error


def _raise_in(
    module: str, code: str = "def boom():\n    None.writelines([b'x'])\n"
) -> BaseException:
    namespace: dict[str, object] = {"__name__": module}
    exec(code, namespace)  # a function whose frame belongs to ``module``
    try:
        namespace["boom"]()  # type: ignore[operator]
    except (AttributeError, RuntimeError) as exc:
        return exc
    raise AssertionError("did not raise")


_DICT_CHANGED = "def boom():\n    d = {1: 1}\n    for k in d:\n        d[k + 1] = 1\n"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ClusterDownError("CLUSTERDOWN"), True),
        (SlotNotCoveredError("slot 6503 is not covered"), True),
        (RedisClusterException("EVAL - all keys must map to the same key slot"), False),
        (ConnectionResetError(), True),
        (_raise_in("redis.asyncio.connection"), True),  # redis-py racing its own reconnect
        (_raise_in("worker.actions"), False),  # a bug of ours stays a bug
        (_raise_in("redis.asyncio.cluster", _DICT_CHANGED), True),  # its slot map refreshes
        (ValueError("bad"), False),
    ],
)
def test_classification(exc: BaseException, expected: bool) -> None:
    assert is_redis_error(exc) is expected
