"""Static checks of the container setup: Dockerfile.worker, .dockerignore,
docker-compose.yml and deploy/redis/redis.conf.

There is no Docker engine on the test machines, so nothing is built or run:
the files are linted (hadolint), validated (compose specification schema) and
parsed, and the facts the runtime depends on are asserted.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.worker"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"

ROOT_USERS = {"root", "0"}


# --------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    """A console script of the venv running the tests, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH (dev extra)")
    return found


@dataclass
class Instruction:
    keyword: str
    args: str
    flags: dict[str, str] = field(default_factory=dict)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _split_flags(args: str) -> tuple[dict[str, str], str]:
    """Leading ``--flag=value`` options of COPY/HEALTHCHECK/RUN, and the rest."""
    flags: dict[str, str] = {}
    rest = args
    while True:
        m = re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest)
        if m is None:
            return flags, rest
        flags[m.group(1)] = m.group(2) or ""
        rest = rest[m.end() :]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped by stage (line continuations joined, comments dropped)."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comments, also inside a continued instruction
        if not stripped and not buf:
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1].rstrip() + " "
            continue
        buf += stripped
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    if buf.strip():
        logical.append(buf.strip())

    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            _, rest = _split_flags(args)
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
            continue
        if not stages:
            continue  # ARG before the first FROM
        flags, rest = _split_flags(args) if keyword in {"COPY", "ADD", "RUN"} else ({}, args)
        stages[-1].instructions.append(Instruction(keyword, rest, flags))
    return stages


def _exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT (fails on shell form)."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not exec form (JSON array): {args!r}")
    assert isinstance(value, list)
    assert all(isinstance(v, str) for v in value)
    return value


def _healthcheck_cmd(args: str) -> list[str]:
    """The exec-form command of ``HEALTHCHECK [options] CMD [...]``."""
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", args)
    assert m is not None, f"HEALTHCHECK is not 'CMD [exec form]': {args!r}"
    return _exec_form(m.group(1))


_COMPOSE_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_REDIS_UNITS = {
    "": 1,
    "k": 1000,
    "kb": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
}


def compose_bytes(value: str | int) -> int:
    """Compose byte value: ``512M``, ``1g``, ``1024kb``, or a plain integer."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)\s*([bkmg])?b?", str(value).strip().lower())
    assert m is not None, f"bad compose byte value {value!r}"
    return int(m.group(1)) * _COMPOSE_UNITS[m.group(2) or "b"]


def redis_bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg]b?)?", value.strip().lower())
    assert m is not None, f"bad redis memory value {value!r}"
    return int(m.group(1)) * _REDIS_UNITS[m.group(2) or ""]


_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def compose_seconds(value: str | int | float) -> float:
    """Compose duration (Go style: ``30s``, ``1m30s``, ``1.5s``, ``500ms``) in seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {value!r}"
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_redis_conf(text: str) -> dict[str, list[list[str]]]:
    """directive -> every occurrence's arguments (``save`` may repeat)."""
    conf: dict[str, list[list[str]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        conf.setdefault(words[0].lower(), []).append(words[1:])
    return conf


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def _dockerignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether a context path is excluded (simplified .dockerignore semantics)."""
    excluded = False
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def redis_conf() -> dict[str, list[list[str]]]:
    return parse_redis_conf(REDIS_CONF.read_text())


# --------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes_without_any_finding() -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", DOCKERFILE.name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
    assert proc.stderr.strip() == "", proc.stderr


def test_dockerfile_is_multi_stage_with_pinned_bases(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    for stage in stages:
        image, _, tag = stage.base.partition(":")
        assert tag and tag != "latest", f"unpinned base image {stage.base!r}"
        assert image.endswith("python") and "slim" in tag, stage.base


def test_runtime_stage_copies_only_the_built_venv(stages: list[Stage], final: Stage) -> None:
    builders = {s.name for s in stages[:-1]} | {str(i) for i in range(len(stages) - 1)}
    copies = final.all("COPY") + final.all("ADD")
    assert copies, "the runtime stage copies nothing"
    for ins in copies:
        assert ins.flags.get("from") in builders, f"runtime stage copies from the context: {ins}"
    assert not final.all("RUN") or all("pip install" not in i.args for i in final.all("RUN"))


def test_final_stage_runs_as_non_root(final: Stage) -> None:
    users = final.all("USER")
    assert users, "the final stage has no USER (would run as root)"
    user, _, group = users[-1].args.partition(":")
    assert user not in ROOT_USERS, f"final USER is root: {users[-1].args!r}"
    assert group not in ROOT_USERS, f"final USER's group is root: {users[-1].args!r}"


def test_healthcheck_probes_livez(final: Stage) -> None:
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1, "expected exactly one HEALTHCHECK in the final stage"
    cmd = _healthcheck_cmd(checks[0].args)
    assert cmd == ["python", "-m", "worker.healthcheck"], "slim has no curl/wget: probe with python"
    assert re.search(r"--timeout=\d", checks[0].args), "HEALTHCHECK without --timeout"


async def test_the_image_healthcheck_finds_the_worker_or_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """worker.healthcheck (the HEALTHCHECK): healthy when /livez answers on the worker's
    or the API's port, unhealthy when neither does; it never asks /readyz."""
    import asyncio

    from aiohttp import web

    from worker.embedded_redis import free_port
    from worker.healthcheck import alive

    asked: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/livez", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    closed = str(free_port())
    try:
        # HTTP_PROXY must not send the probe elsewhere (a proxy that is not there)
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
        for env in ({"CAMPAIGN_HTTP_PORT": str(port), "CAMPAIGN_API_PORT": closed},
                    {"CAMPAIGN_HTTP_PORT": closed, "CAMPAIGN_API_PORT": str(port)}):  # fmt: skip
            assert await asyncio.to_thread(alive, env, 2.0)
        assert not await asyncio.to_thread(alive, {"CAMPAIGN_HTTP_PORT": closed,
                                                   "CAMPAIGN_API_PORT": closed}, 2.0)  # fmt: skip
    finally:
        await runner.cleanup()
    assert asked == ["/livez", "/livez"]


def test_stopsignal_is_sigterm(final: Stage) -> None:
    signals = final.all("STOPSIGNAL")
    assert signals, "STOPSIGNAL missing"
    assert signals[-1].args in {"SIGTERM", "15"}


def test_cmd_is_exec_form_campaign_worker_run(final: Stage) -> None:
    cmds = final.all("CMD")
    assert cmds, "CMD missing"
    assert _exec_form(cmds[-1].args) == ["campaign-worker", "run"]
    assert not final.all("ENTRYPOINT"), "an ENTRYPOINT would wrap the CMD"


def test_runtime_settings(final: Stage) -> None:
    env = " ".join(i.args for i in final.all("ENV"))
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    exposed = {p for i in final.all("EXPOSE") for p in i.args.split()}
    assert {"8080", "8000"} <= exposed, exposed


def test_no_dev_dependencies_installed(stages: list[Stage]) -> None:
    runs = [i.args for s in stages for i in s.all("RUN")]
    installs = [r for r in runs if "pip install" in r]
    assert installs, "no pip install found"
    for cmd in installs:
        assert "[dev" not in cmd and "[embedded" not in cmd, f"extras installed: {cmd}"
        assert not re.search(r"\b(pytest|ruff|mypy|hypothesis)\b", cmd), cmd
        assert " -e " not in f" {cmd} " and "--editable" not in cmd, "editable install"
        assert "--no-cache-dir" in cmd, f"pip cache kept in the layer: {cmd}"


def test_copied_sources_exist_and_are_not_dockerignored(stages: list[Stage]) -> None:
    patterns = _dockerignore_patterns()
    sources = [
        src
        for s in stages
        for ins in s.all("COPY")
        if "from" not in ins.flags
        for src in ins.args.split()[:-1]
    ]
    assert sources, "the build copies nothing from the context"
    for src in sources:
        rel = src.removeprefix("./").rstrip("/")
        assert (ROOT / rel).exists(), f"COPY source {src!r} does not exist in the repository"
        assert not _dockerignored(rel, patterns), f"COPY source {src!r} is in .dockerignore"


# --------------------------------------------------------------------------- .dockerignore


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_containers.py",
        "bench/run.py",
        "app/__pycache__/keys.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/README.md",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert _dockerignored(path, _dockerignore_patterns()), f"{path} is sent to the build"


# --------------------------------------------------------------------------- compose


def test_compose_validates_against_compose_spec() -> None:
    proc = subprocess.run(
        [
            _tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            COMPOSE.name,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_has_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "`version:` is obsolete in the compose specification"
    assert {"redis", "worker", "api", "jaeger"} <= set(compose["services"])


def test_compose_states_that_it_needs_compose_v2(compose: dict[str, Any]) -> None:
    """The top-level ``name:`` is a Compose v2 feature: the header comment says so."""
    assert "name" in compose
    header = []
    for line in COMPOSE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = " ".join(" ".join(header).split())
    assert "Compose v2" in text and "`name:`" in text, text
    assert "docker compose version" in text


def test_redis_healthcheck_is_redis_cli_ping(services: dict[str, Any]) -> None:
    hc = services["redis"]["healthcheck"]
    assert re.search(r"\bredis-cli\b.*\bping\b", _healthcheck_text(services["redis"]))
    assert {"interval", "timeout", "retries"} <= set(hc)


def test_redis_mounts_config_and_named_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    redis = services["redis"]
    mounts: dict[str, dict[str, Any]] = {}
    for vol in redis["volumes"]:
        if isinstance(vol, str):
            source, target, *mode = vol.split(":")
            vol = {"source": source, "target": target, "read_only": "ro" in mode}
        mounts[vol["target"]] = vol

    data = mounts.get("/data")
    assert data is not None, "nothing mounted at /data"
    assert data["source"] in (compose.get("volumes") or {}), "/data is not a named volume"

    conf_targets = [t for t, v in mounts.items() if str(v["source"]).endswith("redis.conf")]
    assert conf_targets, "redis.conf is not mounted"
    conf = mounts[conf_targets[0]]
    assert (ROOT / conf["source"]).resolve() == REDIS_CONF.resolve()
    assert conf.get("read_only") is True, "redis.conf should be mounted read-only"

    command = redis["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    assert command[0] == "redis-server"
    assert command[1] == conf["target"], "redis-server is not started with the mounted config"
    if "--dir" in command:
        assert command[command.index("--dir") + 1] == "/data"


def test_redis_memory_limit_exceeds_maxmemory(
    services: dict[str, Any], redis_conf: dict[str, list[list[str]]]
) -> None:
    limit = services["redis"]["deploy"]["resources"]["limits"]["memory"]
    maxmemory = redis_bytes(redis_conf["maxmemory"][-1][0])
    assert compose_bytes(limit) > maxmemory, "no headroom for fork/COW above maxmemory"


def test_worker_waits_for_healthy_redis(services: dict[str, Any]) -> None:
    depends = services["worker"]["depends_on"]
    assert isinstance(depends, dict), "short depends_on syntax cannot wait for health"
    assert depends["redis"]["condition"] == "service_healthy"


def test_worker_healthcheck_probes_livez(services: dict[str, Any]) -> None:
    text = _healthcheck_text(services["worker"])
    assert "/livez" in text
    assert "/readyz" not in text, "liveness must not depend on Redis"


def test_worker_stop_grace_exceeds_shutdown_grace(services: dict[str, Any]) -> None:
    worker = services["worker"]
    grace = float(_env(worker)["CAMPAIGN_SHUTDOWN_GRACE"])
    stop = compose_seconds(worker["stop_grace_period"])
    assert stop > grace, f"stop_grace_period {stop}s <= CAMPAIGN_SHUTDOWN_GRACE {grace}s"
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_worker_environment(services: dict[str, Any]) -> None:
    env = _env(services["worker"])
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"] == "campaign-worker"


def test_worker_build_and_port(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == DOCKERFILE.name
    assert (ROOT / worker["build"].get("context", ".") / DOCKERFILE.name).is_file()
    ports = [str(p) if not isinstance(p, dict) else str(p["target"]) for p in worker["ports"]]
    assert any(p.split(":")[-1].split("/")[0] == "8080" for p in ports)


def test_jaeger_exposes_otlp_and_ui(services: dict[str, Any]) -> None:
    jaeger = services["jaeger"]
    image, _, tag = jaeger["image"].partition(":")
    assert image == "jaegertracing/all-in-one"
    assert tag and tag != "latest", "pin the jaeger image"
    targets = set()
    for p in jaeger["ports"]:
        targets.add(int(p["target"]) if isinstance(p, dict) else int(str(p).split(":")[-1]))
    assert {4317, 4318, 16686} <= targets
    assert str(_env(jaeger).get("COLLECTOR_OTLP_ENABLED", "")).lower() == "true"


# --------------------------------------------------------------------------- compose: api


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else shlex.split(command)


def test_api_service_runs_the_worker_image_with_the_api_command(
    services: dict[str, Any], final: Stage
) -> None:
    """Same image and build as the worker; ``campaign-worker api`` replaces the image's
    CMD (there is no ENTRYPOINT to prepend to it)."""
    api, worker = services["api"], services["worker"]
    assert api["image"] == worker["image"]
    assert api["build"] == worker["build"], "a different build would be a different image"
    assert not final.all("ENTRYPOINT")
    assert _command(api) == ["campaign-worker", "api"]
    assert "profiles" not in api, "the API starts with a plain `up`"


def test_api_listens_on_all_interfaces_and_is_published_on_loopback(
    services: dict[str, Any],
) -> None:
    api = services["api"]
    env = _env(api)
    assert env["CAMPAIGN_API_HOST"] == "0.0.0.0", "127.0.0.1 is unreachable from the host"
    port = env.get("CAMPAIGN_API_PORT", "8000")
    assert port == "8000"
    published = {
        (str(p.get("published")), str(p["target"])) if isinstance(p, dict)
        else tuple(str(p).split("/")[0].split(":")[-2:])
        for p in api["ports"]
    }  # fmt: skip
    assert ("8000", port) in published, published
    host_ips = [
        p.get("host_ip") if isinstance(p, dict) else str(p).rsplit(":", 2)[0]
        for p in api["ports"]
    ]  # fmt: skip
    assert host_ips == ["127.0.0.1"], "plain HTTP with tokens: the host's loopback only"


def test_api_tokens_are_required_and_not_hard_coded(services: dict[str, Any]) -> None:
    """A required variable (``${VAR:?message}``): compose refuses to start without it and
    says why; the file never holds a token."""
    value = _env(services["api"])["CAMPAIGN_API_TOKENS"]
    m = re.fullmatch(r"\$\{CAMPAIGN_API_TOKENS:\?(?P<message>[^}]+)\}", value)
    assert m is not None, f"CAMPAIGN_API_TOKENS must be ${{CAMPAIGN_API_TOKENS:?...}}: {value!r}"
    assert "CAMPAIGN_API_TOKENS" in m["message"]
    text = COMPOSE.read_text()
    for service in services.values():
        for name, setting in _env(service).items():
            if "TOKEN" in name or "SECRET" in name:
                assert setting.startswith("${"), f"{name} is written in the file: {setting!r}"
    # The header tells the reader to set it before `docker compose up`.
    assert "export CAMPAIGN_API_TOKENS=" in text


def test_api_environment(services: dict[str, Any]) -> None:
    api_env, worker_env = _env(services["api"]), _env(services["worker"])
    assert api_env["REDIS_URL"] == worker_env["REDIS_URL"], "the API and workers share a Redis"
    trace_url = api_env["CAMPAIGN_TRACE_URL"]
    assert trace_url == "http://localhost:16686/trace/{trace_id}", trace_url
    jaeger_ui = [p for p in services["jaeger"]["ports"] if str(p).startswith("16686:")]
    assert jaeger_ui, "the trace link points at the Jaeger UI's published port"
    assert api_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert api_env["OTEL_SERVICE_NAME"] == "campaign-api"


def test_api_settings_are_accepted_by_the_settings(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The api service's environment loads (with a stand-in for the required token)."""
    from app.settings import Settings

    for name, value in _env(services["api"]).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CAMPAIGN_API_TOKENS", "a-stand-in-token-of-32-characters")
    settings = Settings.load()
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", 8000)
    assert settings.trace_url == "http://localhost:16686/trace/{trace_id}"


def test_api_waits_for_healthy_redis(services: dict[str, Any]) -> None:
    depends = services["api"]["depends_on"]
    assert isinstance(depends, dict), "short depends_on syntax cannot wait for health"
    assert depends["redis"]["condition"] == "service_healthy"


def test_api_healthcheck_probes_its_own_livez(services: dict[str, Any]) -> None:
    """The image's HEALTHCHECK probes the worker's port: the api service replaces it with
    one on the API's port, liveness only (like the worker's)."""
    api = services["api"]
    text = _healthcheck_text(api)
    assert "/livez" in text and "/readyz" not in text, "liveness must not depend on Redis"
    assert "CAMPAIGN_API_PORT" in text and "'8000'" in text
    assert "CAMPAIGN_HTTP_PORT" not in text and "8080" not in text
    assert text.split()[:2] == ["CMD", "python"], "slim has no curl/wget: probe with python"
    hc = api["healthcheck"]
    assert {"interval", "timeout", "retries"} <= set(hc)
    assert compose_seconds(hc["timeout"]) > 2, "above the probe's own 2 s timeout"


# --------------------------------------------------------------------------- redis.conf


def test_redis_conf_aof_everysec(redis_conf: dict[str, list[list[str]]]) -> None:
    assert redis_conf["appendonly"][-1] == ["yes"]
    assert redis_conf["appendfsync"][-1] == ["everysec"]


def test_redis_conf_rdb_snapshots_enabled(redis_conf: dict[str, list[list[str]]]) -> None:
    saves = redis_conf.get("save", [])
    assert saves, "no RDB save points"
    assert all(args and args != [""] for args in saves), 'save "" disables RDB'


def test_redis_conf_memory_policy(redis_conf: dict[str, list[list[str]]]) -> None:
    assert redis_bytes(redis_conf["maxmemory"][-1][0]) > 0
    assert redis_conf["maxmemory-policy"][-1] == ["noeviction"]


def test_redis_conf_runs_in_foreground(redis_conf: dict[str, list[list[str]]]) -> None:
    assert redis_conf.get("daemonize", [["no"]])[-1] == ["no"], "container would exit"


# --------------------------------------------------------------------------- parsers


def test_parsers() -> None:
    assert compose_seconds("30s") == 30
    assert compose_seconds("1m30s") == 90
    assert compose_seconds("500ms") == 0.5
    assert compose_bytes("512M") == 512 * 1024**2
    assert compose_bytes("1gb") == 1024**3
    assert redis_bytes("256mb") == 256 * 1024**2
    assert redis_bytes("1g") == 1000**3
    with pytest.raises(AssertionError):
        compose_seconds("30")
    stages = parse_dockerfile(
        "FROM a:1 AS b\nRUN x \\\n  # c\n  && y\nFROM c:2\nCOPY --from=b /o /o\nUSER 1\n"
    )
    assert [s.name for s in stages] == ["b", None]
    assert stages[0].instructions[0].args == "x && y"
    assert stages[1].all("COPY")[0].flags == {"from": "b"}
    assert _dockerignored("a/__pycache__/x.pyc", ["**/__pycache__"])
    assert not _dockerignored("app/x.py", ["**/__pycache__", "tests"])


def test_image_build_context_has_every_packaged_data_file() -> None:
    """`pip install .` in the image needs every data file pyproject.toml ships."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    data_files = project["tool"]["setuptools"]["data-files"]
    dockerfile = (root / "Dockerfile.worker").read_text()
    for files in data_files.values():
        for name in files:
            top = name.split("/", 1)[0]
            assert f"COPY {top} " in dockerfile, f"Dockerfile.worker does not copy {top}/ ({name})"
            assert (root / name).exists(), name
