"""What engineers look at: the Grafana dashboard and the alert rules name only metrics a live `her serve` exports,
and a real Prometheus server (Debian's package) scrapes it, answers judge-health queries, runs every dashboard
query and evaluates the shipped alert rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from _openai_server import free_port
from _servers import wait_for
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "her-genrm.json"
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\b(?:rm_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
PAIR = {"context": "Mr Bennet: Lizzy, come into my room.", "a": "<role_action>follows him</role_action>Yes, Papa?",
        "b": ":", "mode": "fast", "use_cache": False}
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus server is not on PATH (`make test` installs Debian's package as root)")


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", []) if t.get("expr")]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return queries


def alert_expressions() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metric_names(query: str) -> set[str]:
    """Our and vLLM's metric names in a PromQL query (label values such as job="rm_server" are not names)."""
    return set(METRIC.findall(re.sub(r'"[^"]*"', '""', query)))


def live_metric_names(base_url: str) -> set[str]:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def judged_server(rm_server) -> str:
    """The suite's `her serve` (vLLM) after a fresh judgment, so every judge-health series has a value."""
    verdict = httpx.post(rm_server.base_url + "/v1/judge", json=PAIR, timeout=300)
    assert verdict.status_code == 200 and verdict.json()["status"] == "ok", verdict.text
    return rm_server.base_url


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(dashboard["panels"])}) == len(list(_panels(dashboard["panels"])))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"instance", "model"} <= variables
    for panel in panels:
        named = {re.sub(r"_(bucket|sum|count)$", "", name)
                 for target in panel["targets"] for name in metric_names(target["expr"])}
        assert named, f"panel {panel['title']!r} queries no metric of ours"
        assert all(name in panel["description"] for name in named), (
            f"panel {panel['title']!r}: its description must name {sorted(named)}")
        for target in panel["targets"]:
            assert "[" not in target["expr"] or "$__rate_interval" in target["expr"], target["expr"]


@pytest.mark.model
def test_every_metric_of_the_dashboard_and_alerts_is_on_a_live_metrics_page(judged_server):
    live = live_metric_names(judged_server)
    named = {name for query in dashboard_queries() + alert_expressions() for name in metric_names(query)}
    assert any(n.startswith("vllm:") for n in named) and any(n.startswith("rm_") for n in named)
    missing = sorted(named - live)
    assert not missing, f"named in the dashboard or alerts but not exported: {missing}"


class PrometheusServer:
    """Debian's prometheus binary with a throw-away TSDB, scraping one target every second."""

    def __init__(self, workdir: Path, target: str, rule_files: list[Path]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "rm_server", "static_configs": [{"targets": [target]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.argv = [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def __enter__(self) -> PrometheusServer:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, "ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def api(self, path: str, **params: str) -> dict:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]

    def wait_for(self, check, what: str, timeout: float = 300.0):  # noqa: ANN001
        return wait_for(check, f"prometheus: {what}", timeout, every_s=0.5,
                        ignore=(httpx.HTTPError, AssertionError, KeyError), detail=lambda: self.log.read_text()[-2000:])


# A rule that must fire against a serving judge: the shipped rules wait for 50 judgments and 10 minutes.
FIRING_RULE = {"groups": [{"name": "test", "rules": [{
    "alert": "RMJudgeServing",
    "expr": "rm_ready == 1 and on(job, instance) rm_window_judgments > 0 and on(job, instance) "
            "rm_swap_consistency_ratio >= 0",
    "labels": {"severity": "info"},
}]}]}


@needs_prometheus
@pytest.mark.model
def test_real_prometheus_scrapes_queries_and_evaluates_rules(judged_server, tmp_path):
    rules = tmp_path / "firing.yml"
    rules.write_text(yaml.safe_dump(FIRING_RULE))
    target = judged_server.removeprefix("http://")
    with PrometheusServer(tmp_path, target, [ALERTS, rules]) as prom:
        up = prom.wait_for(lambda: [r for r in prom.api("query", query="up")["result"] if r["value"][1] == "1"],
                           "a successful scrape")
        assert up[0]["metric"]["instance"] == target

        # Judge-health series are queryable, with the value the server exports.
        judged = prom.wait_for(lambda: prom.api("query", query="rm_window_judgments")["result"], "judge health")
        assert float(judged[0]["value"][1]) >= 1
        swap = prom.api("query", query="rm_swap_consistency_ratio")["result"]
        assert swap and 0.0 <= float(swap[0]["value"][1]) <= 1.0
        assert prom.api("query", query='rm_model_info{model="smollm2-135m-instruct"}')["result"]

        # Every dashboard query is valid PromQL and runs (Grafana's variables filled in as "All").
        for query in dashboard_queries():
            if query.startswith("label_values("):
                continue
            filled = (query.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$model", ".*"))
            prom.api("query", query=filled)

        # The shipped rules load and evaluate without error; the test rule fires.
        def evaluated() -> list[dict]:
            groups = prom.api("rules")["groups"]
            rules_ = [r for g in groups for r in g["rules"]]
            return rules_ if all(r.get("lastEvaluation", "").startswith("20") for r in rules_) else []

        all_rules = prom.wait_for(evaluated, "every rule evaluated")
        shipped = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
        assert shipped <= {r["name"] for r in all_rules}
        assert all(r["health"] == "ok" for r in all_rules), [(r["name"], r.get("lastError")) for r in all_rules]
        firing = prom.wait_for(
            lambda: [a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == "RMJudgeServing"
                     and a["state"] == "firing"], "RMJudgeServing firing")
        assert firing[0]["labels"]["instance"] == target
