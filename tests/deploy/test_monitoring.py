"""The monitoring setup: Prometheus alert rules and config, the Grafana dashboard and the
compose ``monitoring`` profile.

- ``promtool`` (Debian's prometheus package, which ``.ci/run`` installs; skipped with the
  command that gets it when missing outside CI) checks the rules,
  runs their unit tests (``alerts_test.yml``) and checks the config;
- every PromQL expression of the dashboard is parsed by promtool too;
- every metric name used by the alerts and the dashboard must exist in a real ``/metrics``
  scrape of a real ``campaign-worker`` that ran a campaign;
- a real Prometheus server scrapes a real worker while ~50 enrollments run through it, and
  the query API shows the job counter rising and the due queue draining to 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from app import CampaignClient
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from worker.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "campaign-worker.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards"
COMPOSE = ROOT / "docker-compose.yml"

JOB = "campaign-worker"

# alert -> (severity, for)
EXPECTED_ALERTS = {
    "CampaignWorkerDown": ("warning", "1m"),
    "CampaignWorkerHeartbeatStale": ("warning", "1m"),
    "CampaignNoWorkers": ("critical", "2m"),
    "CampaignDueJobsPiling": ("warning", "5m"),
    "CampaignLatenessHigh": ("warning", "10m"),
    "CampaignFailureRatioHigh": ("warning", "5m"),
    "CampaignPoisonJobs": ("warning", None),
    "CampaignRedisDown": ("critical", "1m"),
    "CampaignRedisMemoryHigh": ("warning", "5m"),
}

# Every worker exports the same value of these (read from Redis): max, never sum.
QUEUE_WIDE = {
    "campaign_queue_jobs",
    "campaign_enrollments",
    "campaign_dead_letter_jobs",
    "campaign_workers_alive",
    "campaign_queue_oldest_due_age_seconds",
    "campaign_redis_memory_bytes",
}

# Grafana variables -> values that make the expressions plain PromQL.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": JOB,
    "$instance": ".*",
}

MISSING_PROMETHEUS = (
    "{name} not found at /usr/bin/{name} or on PATH; install it with "
    "`sudo apt-get install -y prometheus` (Debian's package brings promtool and the server; "
    "scripts/test.sh installs it when run as root, as CI does), or put {name} from "
    "https://prometheus.io/download/ on PATH"
)


def _binary(name: str) -> str:
    """The path of ``name``; when it is missing the test is skipped with the command that
    gets it, or fails under CI (``REQUIRE_PROMTOOL=1``, set by ``.ci/run``)."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None
    )
    if found is None:
        if os.environ.get("REQUIRE_PROMTOOL") == "1":
            pytest.fail(MISSING_PROMETHEUS.format(name=name) + " (REQUIRE_PROMTOOL=1)")
        pytest.skip(MISSING_PROMETHEUS.format(name=name))
    return found


def promtool(*args: str, cwd: Path = ROOT) -> str:
    """Run promtool; fail with its output unless it exits 0."""
    proc = subprocess.run(
        [_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels") or [])


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title and refId, raw expression) of every dashboard target."""
    out = []
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                out.append((f"{panel['title']} [{target.get('refId')}]", target["expr"]))
    return out


def plain_promql(expr: str) -> str:
    """A dashboard expression with the Grafana variables replaced by example values."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unhandled Grafana variable in {expr!r}"
    return expr


_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers that are not functions, keywords,
    label names, label values or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if m.group(2) is None and m.group(1).lower() not in _NOT_METRICS:
            names.add(m.group(1))
    return names


def exposed_names(exposition: str) -> set[str]:
    """Sample names a scrape can contain, from its ``# TYPE`` lines (families without
    observations, e.g. labelled counters never incremented, have no sample lines)."""
    names: set[str] = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        name, kind = m.groups()
        names.add(name)
        if kind == "counter":
            names.add(name if name.endswith("_total") else name + "_total")
        elif kind in ("histogram", "gaugehistogram"):
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {f"{name}_sum", f"{name}_count"}
    return names


def sampled_names(exposition: str) -> set[str]:
    """Names with at least one sample line."""
    return set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", exposition, re.MULTILINE))


def used_metric_names() -> dict[str, set[str]]:
    """metric name -> where it is used (alert names, dashboard panels, variables)."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for where, expr in dashboard_exprs():
        for name in metric_names(plain_promql(expr)):
            used.setdefault(name, set()).add(f"panel {where}")
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for name in re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", text):
            used.setdefault(name, set()).add(f"variable {var['name']}")
    return used


def http_step(path: str, svc: FakeService, nxt: str, **extra: Any) -> dict[str, Any]:
    return {"type": "action", "action": "http", "params": {"url": svc.url(path)}, "next": nxt,
            **extra}  # fmt: skip


def fast_retry() -> dict[str, Any]:
    return {"max_attempts": 3, "backoff": "fixed", "base_delay": 0.05, "max_delay": 0.05,
            "jitter": False}  # fmt: skip


async def scrape(worker: WorkerProcess) -> str:
    """GET /metrics in the classic text format (``# TYPE`` lines carry ``_total``)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            worker.base + "/metrics",
            headers={"Accept": "text/plain; version=0.0.4"},
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp,
    ):
        assert resp.status == 200
        return await resp.text()


class PrometheusServer:
    """``/usr/bin/prometheus`` as a subprocess on 127.0.0.1, with its own TSDB directory."""

    def __init__(self, config: Path, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.port = free_port()
        self.log_path = data_dir.parent / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    _binary("prometheus"),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.data_dir}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    async def api(self, path: str, **params: str) -> Any:
        """GET an API path; None while the server does not answer yet."""
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    self.base + path, params=params, timeout=aiohttp.ClientTimeout(total=5)
                ) as resp,
            ):
                if resp.content_type != "application/json":
                    return {"status": resp.status, "body": await resp.text()}
                return await resp.json()
        except aiohttp.ClientError:
            return None

    async def query(self, expr: str) -> list[dict[str, Any]]:
        doc = await self.api("/api/v1/query", query=expr)
        assert doc is not None and doc.get("status") == "success", f"{expr}: {doc}"
        result = doc["data"]["result"]
        assert isinstance(result, list)
        return result

    async def value(self, expr: str) -> float | None:
        """The single value of an instant query; None when it returns nothing."""
        result = await self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1]) if result else None


# --------------------------------------------------------------------------- fixtures


# --------------------------------------------------------------------------- alert rules


def test_alert_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in out, out


def test_alert_rule_unit_tests_pass() -> None:
    out = promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert "SUCCESS" in out, out


def test_alerts_are_the_expected_set_with_severity_and_runbook() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == set(EXPECTED_ALERTS)
    assert [g["name"] for g in load_yaml(ALERTS)["groups"]] == ["campaign-scheduler"]
    for rule in rules:
        severity, duration = EXPECTED_ALERTS[rule["alert"]]
        assert rule["labels"]["severity"] == severity, rule["alert"]
        assert rule.get("for") == duration, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert len(annotations["description"]) > 80, f"{rule['alert']}: no runbook hint"
        assert "Check" in annotations["description"], f"{rule['alert']}: what to check?"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        assert case["input_series"], case["name"]
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(EXPECTED_ALERTS), f"never shown firing: {set(EXPECTED_ALERTS) - firing}"
    assert quiet == set(EXPECTED_ALERTS), f"never shown quiet: {set(EXPECTED_ALERTS) - quiet}"


def test_thresholds_match_the_runbook() -> None:
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules()}
    assert exprs["CampaignWorkerDown"] == f'up{{job="{JOB}"}} == 0'
    assert "> 60" in exprs["CampaignWorkerHeartbeatStale"]
    assert "absent(campaign_workers_alive)" in exprs["CampaignNoWorkers"]
    assert "> 1000" in exprs["CampaignDueJobsPiling"] and "> 60" in exprs["CampaignDueJobsPiling"]
    assert "histogram_quantile(0.99" in exprs["CampaignLatenessHigh"]
    assert exprs["CampaignLatenessHigh"].endswith("> 30")
    assert "> 0.05" in exprs["CampaignFailureRatioHigh"]
    assert ">= 20" in exprs["CampaignFailureRatioHigh"], "no minimum volume guard"
    assert "> 0.85" in exprs["CampaignRedisMemoryHigh"]
    assert 'kind="max"} > 0' in exprs["CampaignRedisMemoryHigh"], "max 0 means no limit"


def _check_queue_wide_aggregation(where: str, expr: str) -> None:
    """Queue-wide metrics only ever appear directly inside max(...) (or absent(...))."""
    flat = " ".join(expr.split())
    for name in QUEUE_WIDE:
        uses = len(re.findall(rf"\b{name}\b", flat))
        wrapped = len(
            re.findall(rf"\b(?:max(?: (?:without|by) ?\([^)]*\))? ?|absent)\(\s*{name}\b", flat)
        )
        assert uses == wrapped, f"{where}: {name} must be aggregated with max, never sum: {expr}"


def test_queue_wide_metrics_are_aggregated_with_max() -> None:
    for rule in alert_rules():
        _check_queue_wide_aggregation(f"alert {rule['alert']}", rule["expr"])
    for where, expr in dashboard_exprs():
        _check_queue_wide_aggregation(f"panel {where}", expr)


# Labels a scrape adds per target: `instance` everywhere, `pod` (and `namespace`) with the
# Kubernetes discovery of prometheus.yml. An aggregation that keeps one of them keeps one
# series per worker, and a panel or a sum over them multiplies queue-wide counts.
PER_TARGET_LABELS = {"instance", "pod"}


def _check_drops_per_target_labels(where: str, expr: str) -> None:
    """Every ``max without (...)`` over a queue-wide metric drops instance and pod."""
    flat = " ".join(expr.split())
    for name in QUEUE_WIDE:
        for labels in re.findall(rf"\bmax without ?\(([^)]*)\) ?\(\s*{name}\b", flat):
            dropped = {label.strip() for label in labels.split(",")}
            assert dropped >= PER_TARGET_LABELS, (
                f"{where}: max without ({labels}) over {name} keeps "
                f"{sorted(PER_TARGET_LABELS - dropped)}: one series per pod, so two pods double "
                f"a queue-wide count; use max without (instance, pod): {expr}"
            )


def test_queue_wide_max_without_drops_instance_and_pod() -> None:
    """The README's rule: ``max without(instance, pod)``; a dashboard that drops only
    ``instance`` shows (and sums) one series per pod on Kubernetes."""
    config_text = PROM_CONFIG.read_text()
    assert "target_label: pod" in config_text, "the Kubernetes example no longer adds `pod`"
    checked = 0
    for where, expr in dashboard_exprs():
        _check_drops_per_target_labels(f"panel {where}", expr)
        checked += "max without" in expr
    for rule in alert_rules():
        _check_drops_per_target_labels(f"alert {rule['alert']}", rule["expr"])
    assert checked >= 5, "the dashboard no longer uses max without(...): revisit this test"


def test_per_target_label_check_catches_instance_only() -> None:
    with pytest.raises(AssertionError, match="keeps \\['pod'\\]"):
        _check_drops_per_target_labels(
            "x", 'sum by (state) (max without (instance) (campaign_enrollments{job="j"}))'
        )
    _check_drops_per_target_labels("x", "max without (pod, instance) (campaign_queue_jobs)")


# --------------------------------------------------------------------------- prometheus.yml


def test_prometheus_config_passes_promtool_check() -> None:
    # rule_files are relative to the config file: check it from its own directory, as the
    # container does (/etc/prometheus).
    out = promtool("check", "config", PROM_CONFIG.name, cwd=PROM_DIR)
    assert "SUCCESS: 1 rule files found" in out, out


def test_prometheus_config_scrapes_the_worker() -> None:
    config = load_yaml(PROM_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == [ALERTS.name]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["worker:8080"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_config_scrapes_the_api() -> None:
    """The control API has its own job (the worker alerts match job="campaign-worker"),
    on the compose service and port that serve it."""
    config = load_yaml(PROM_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "campaign-api"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["api:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    api = load_yaml(COMPOSE)["services"]["api"]
    assert 8000 in _port_targets(api)
    assert api["environment"].get("CAMPAIGN_API_PORT", "8000") == "8000"
    assert [j["job_name"] for j in config["scrape_configs"]] == [JOB, "campaign-api"]


def test_commented_kubernetes_example_is_valid(tmp_path: Path) -> None:
    """The commented kubernetes_sd_configs example, uncommented, is valid configuration.

    Debian's prometheus build leaves Kubernetes discovery out ("field kubernetes_sd_configs
    not found"), so promtool checks the example's relabel_configs on the static job, and the
    kubernetes_sd_configs block itself is checked here against the documented fields.
    """
    lines = PROM_CONFIG.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "# kubernetes_sd_configs:")
    indent = lines[start].index("#")
    block = []
    for line in lines[start:]:
        if not line.strip():
            continue
        if not line.startswith(" " * indent + "#"):
            break
        block.append(line[indent + 1 :].removeprefix(" "))
    fragment = yaml.safe_load("\n".join(block))
    assert set(fragment) == {"kubernetes_sd_configs", "relabel_configs"}

    (sd,) = fragment["kubernetes_sd_configs"]
    assert set(sd) <= {"role", "namespaces", "selectors", "api_server", "kubeconfig_file"}
    assert sd["role"] == "pod"
    assert all(isinstance(n, str) for n in sd["namespaces"]["names"])
    for selector in sd["selectors"]:
        assert selector["role"] == sd["role"] and set(selector) <= {"role", "label", "field"}
    labels = {r.get("target_label") for r in fragment["relabel_configs"]}
    assert {"instance", "pod", "namespace"} <= labels

    config = load_yaml(PROM_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    job["relabel_configs"] = fragment["relabel_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    promtool("check", "config", "prometheus.yml", cwd=tmp_path)


# --------------------------------------------------------------------------- dashboard


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool 2.42 has no `promql format`: each target becomes a recording rule that
    `promtool check rules` parses."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    names = {f"dashboard:expr_{i}": where for i, (where, _) in enumerate(exprs)}
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": plain_promql(expr)}
        for i, (_, expr) in enumerate(exprs)
    ]
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [_binary("promtool"), "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    for record, where in names.items():
        output = output.replace(f'"{record}"', f'"{record}" ({where})')
    assert proc.returncode == 0, output
    assert f"SUCCESS: {len(rules)} rules found" in output, output


def test_dashboard_structure_and_descriptions() -> None:
    data = dashboard()
    assert 36 <= data["schemaVersion"] <= 41
    assert data["uid"] == "campaign-worker"
    (ds_var,) = [v for v in data["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["name"] == "DS_PROMETHEUS" and ds_var["query"] == "prometheus"
    assert ds_var["current"]["value"] == "prometheus", "default: the provisioned datasource"
    rows = [p["title"] for p in data["panels"] if p["type"] == "row"]
    assert rows == [
        "Are steps running on time?",
        "What is failing and why?",
        "Is anything stuck?",
        "Are the workers alive?",
    ]
    ids = [p["id"] for p in all_panels(data["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in all_panels(data["panels"]):
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", title
        assert len(panel.get("description", "")) > 40, f"{title}: no description"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", title
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if any(re.search(rf"\b{name}\b", exprs) for name in QUEUE_WIDE):
            assert "never sum" in panel["description"], f"{title}: say max, never sum"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title


def test_dashboard_answers_the_questions() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs())
    for needle in [
        "histogram_quantile(0.50, sum by (le) (rate(campaign_job_lateness_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(campaign_job_lateness_seconds_bucket",
        "campaign_queue_oldest_due_age_seconds",
        'campaign_queue_jobs{job="$job", state="due"}',
        "sum by (function, outcome) (rate(campaign_jobs_total",
        "sum by (action, outcome) (rate(campaign_action_calls_total",
        'outcome=~"failed|error"',
        "campaign_poison_jobs_total",
        'to_state="failed"',
        'state="in_progress"',
        'state="deferred"',
        "campaign_enrollments",
        "up{",
        "campaign_workers_alive",
        "time() - campaign_worker_heartbeat_timestamp_seconds",
        "campaign_redis_up",
        "campaign_redis_memory_bytes",
    ]:
        assert needle in exprs, f"no panel queries {needle!r}"


def test_grafana_provisioning() -> None:
    (ds_file,) = DATASOURCES.glob("*.yml")
    (datasource,) = load_yaml(ds_file)["datasources"]
    assert datasource["uid"] == "prometheus" and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider_file,) = DASHBOARD_PROVIDERS.glob("*.yml")
    (provider,) = load_yaml(provider_file)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# --------------------------------------------------------------------------- compose


def _binds(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's bind mounts (long or short syntax)."""
    out = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target, *_ = vol.split(":")
        else:
            source, target = vol["source"], vol["target"]
        out[target] = source
    return out


def _port_targets(service: dict[str, Any]) -> set[int]:
    return {
        int(p["target"]) if isinstance(p, dict) else int(str(p).split(":")[-1].split("/")[0])
        for p in service.get("ports", [])
    }


def test_compose_monitoring_profile() -> None:
    services = load_yaml(COMPOSE)["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    for name, svc_ in (("prometheus", prom), ("grafana", grafana)):
        assert svc_["profiles"] == ["monitoring"], name
        tag = svc_["image"].partition(":")[2]
        assert tag and tag != "latest", f"pin the {name} image"
    assert prom["image"].startswith("prom/prometheus:")
    assert grafana["image"].startswith("grafana/grafana:")
    for name in ("redis", "worker", "jaeger"):
        assert "profiles" not in services[name], f"{name} must start with a plain `up`"

    binds = _binds(prom)
    assert (ROOT / binds["/etc/prometheus"]).resolve() == PROM_DIR.resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert 9090 in _port_targets(prom)
    # prometheus.yml's target and the datasource URL point at these services.
    assert "worker" in services and 8080 in _port_targets(services["worker"])

    gbinds = _binds(grafana)
    assert (ROOT / gbinds["/etc/grafana/provisioning/datasources"]).resolve() == DATASOURCES
    assert (ROOT / gbinds["/etc/grafana/provisioning/dashboards"]).resolve() == DASHBOARD_PROVIDERS
    assert (
        ROOT / gbinds["/var/lib/grafana/dashboards/campaign-worker.json"]
    ).resolve() == DASHBOARD
    assert 3000 in _port_targets(grafana)
    env = grafana["environment"]
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# --------------------------------------------------------------------------- real scrape


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (reason) ((increase(a_total{x="b_total"}[10m]) > 0) or (c unless c offset 10m))'
        ' / ignoring (kind) max without (instance) (d{kind="max"} > 0) + time() - 1e3'
        ' and label_replace(max(e) > 1, "cause", "f", "", "")'
    )
    assert metric_names(expr) == {"a_total", "c", "d", "e"}
    text = (
        '# HELP x_total X\n# TYPE x_total counter\n# TYPE h histogram\nh_bucket{le="1"} 0\n'
        "# TYPE g gauge\ng 1\n"
    )
    assert exposed_names(text) == {"x_total", "h", "h_bucket", "h_sum", "h_count", "g"}
    assert sampled_names(text) == {"h_bucket", "g"}


async def test_every_metric_used_exists_in_a_real_scrape(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService
) -> None:
    worker = WorkerProcess(redis_server.url).start()
    try:
        await worker.wait_status("/readyz", 200)
        # Successes, a transient failure then success, a permanent failure and a poison job,
        # so the labelled families have samples too.
        await client.register_campaign({
            "id": "scrape", "entry": "first",
            "nodes": {
                "first": http_step("/flaky/1", svc, "second", retry=fast_retry()),
                "second": http_step("/ok", svc, "done"),
                "done": {"type": "exit"},
            },
        })  # fmt: skip
        await client.register_campaign({
            "id": "broken", "entry": "first",
            "nodes": {"first": http_step("/bad", svc, "done"), "done": {"type": "exit"}},
        })  # fmt: skip
        await client.enroll_many("scrape", [{"contact_id": f"s{i}"} for i in range(3)])
        await client.enroll("broken", "b0")
        shard = client.service.keys.shard(0)
        await client.redis.hset(shard.jobs, "monitoring-poison", b"not json")
        await client.redis.zadd(shard.queue, {"monitoring-poison": 1})

        async def settled() -> str:
            text = await scrape(worker)
            done = [
                r'^campaign_enrollments\{campaign="scrape",state="completed"\} 3\.0$',
                r'^campaign_enrollments\{campaign="broken",state="failed"\} 1\.0$',
                r'^campaign_poison_jobs_total\{reason="malformed"\} 1\.0$',
            ]
            return text if all(re.search(d, text, re.M) for d in done) else ""

        text = await eventually(settled, 15, 0.1, "campaign completed and poison job counted")
    finally:
        assert worker.stop() == 0

    exposed = exposed_names(text) | {"up"}  # up is Prometheus's own
    used = used_metric_names()
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not missing, f"used but not exported by the worker: {missing}"
    # Cross-check the name extraction: every campaign_* token of the expressions was seen.
    exprs = [r["expr"] for r in alert_rules()] + [plain_promql(e) for _, e in dashboard_exprs()]
    tokens = {t for e in exprs for t in re.findall(r"\bcampaign_\w+", re.sub(r'"[^"]*"', "", e))}
    assert tokens <= set(used), tokens - set(used)
    assert len(used) >= 15

    sampled = sampled_names(text)
    for name in [
        "campaign_jobs_total",
        "campaign_job_duration_seconds_bucket",
        "campaign_job_lateness_seconds_bucket",
        "campaign_action_calls_total",
        "campaign_action_duration_seconds_bucket",
        "campaign_transitions_total",
        "campaign_poison_jobs_total",
        "campaign_enrollments",
    ]:
        assert name in sampled, f"{name} has no samples after the run"
    for outcome in ("success", "retry", "failed"):
        assert f'campaign_jobs_total{{function="run_step",outcome="{outcome}"}}' in text
    for outcome in ("success", "transient", "permanent"):
        assert f'campaign_action_calls_total{{action="http",outcome="{outcome}"}}' in text


# --------------------------------------------------------------------------- real Prometheus


async def test_real_prometheus_scrapes_a_real_worker(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService, tmp_path: Path
) -> None:
    # Five job slots, and a first step that hangs until released: the other 45 enrollments'
    # jobs stay due, so Prometheus sees the due queue fill up and then drain.
    worker = WorkerProcess(redis_server.url, CAMPAIGN_MAX_JOBS="5").start()
    config = load_yaml(PROM_CONFIG)  # the real job, with test intervals and target
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{worker.http_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = PrometheusServer(tmp_path / "prometheus.yml", tmp_path / "tsdb").start()
    try:
        await worker.wait_status("/readyz", 200)

        async def target_up() -> bool:
            return await prom.value(f'up{{job="{JOB}"}}') == 1

        await eventually(target_up, 15, 0.2, f"worker scraped; log {prom.log_tail()}")

        await client.register_campaign({
            "id": "mon", "entry": "first",
            "nodes": {
                "first": http_step("/hang", svc, "pause1"),
                "pause1": {"type": "delay", "duration": 1.5, "next": "second"},
                "second": http_step("/ok", svc, "pause2"),
                "pause2": {"type": "delay", "duration": 1.5, "next": "third"},
                "third": http_step("/ok", svc, "done"),
                "done": {"type": "exit"},
            },
        })  # fmt: skip
        assert await client.enroll_many("mon", [{"contact_id": f"m{i}"} for i in range(50)]) == 50
        await asyncio.wait_for(svc.hung.wait(), 10)

        due_expr = 'max(campaign_queue_jobs{state="due"})'

        async def due_piled_up() -> float:
            due = await prom.value(due_expr)
            return due if due is not None and due >= 40 else 0.0

        peak = await eventually(due_piled_up, 10, 0.2, "due jobs seen by Prometheus")
        svc.release.set()

        success_expr = 'sum(campaign_jobs_total{outcome="success"})'

        async def success_above(floor: float) -> float:
            value = await prom.value(success_expr)
            return value if value is not None and value > floor else 0.0

        first = await eventually(lambda: success_above(0), 10, 0.2, "first successes")
        second = await eventually(lambda: success_above(first), 10, 0.2, "more successes")
        assert second > first > 0

        async def all_completed() -> bool:
            done = await prom.value('max(campaign_enrollments{campaign="mon", state="completed"})')
            return done == 50

        await eventually(all_completed, 15, 0.2, "50 completed enrollments in Prometheus")

        async def due_drained() -> bool:
            return await prom.value(due_expr) == 0

        await eventually(due_drained, 10, 0.2, f"due queue back to 0 (peak {peak})")
        final = await prom.value(success_expr)
        assert final is not None and final >= 150  # three action steps per enrollment

        # The alert rules load and evaluate on real data without errors ...
        async def rules_healthy() -> list[dict[str, Any]]:
            doc = await prom.api("/api/v1/rules")
            rules = [r for g in doc["data"]["groups"] for r in g["rules"]]
            return rules if all(r["health"] == "ok" for r in rules) else []

        rules = await eventually(rules_healthy, 10, 0.2, "rules evaluated")
        assert {r["name"] for r in rules} == set(EXPECTED_ALERTS)
        firing = {r["name"] for r in rules if r["state"] == "firing"}
        assert not firing, f"alerts firing on a healthy run: {firing}"
        # ... and so does every dashboard expression (no many-to-many matching errors).
        for where, expr in dashboard_exprs():
            try:
                await prom.query(plain_promql(expr))
            except AssertionError as exc:
                raise AssertionError(f"panel {where}: {exc}") from None
        assert await prom.value(f'max(campaign_workers_alive{{job="{JOB}"}})') == 1
    finally:
        prom.stop()
        assert worker.stop() == 0
