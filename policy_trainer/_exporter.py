"""The trainer's side of the dashboard: a Prometheus endpoint for the reward client of a GRPO run.

Prometheus scrapes the judge (rm_server's /metrics) and, with ``metrics_port`` set in a GRPO config, the
trainer too: the step it is on, the rewards of its last call (mean, std, min, max), null rewards, retries and
circuit events, and the wall time of each reward call, so a run's reward curve and the judge's health gauges
sit on one time axis.

Counters are read from the client when Prometheus scrapes (no second copy of them); only the latency
histogram and the step gauge are kept here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from ._reward_client import RewardClient

log = logging.getLogger(__name__)

PREFIX = "her_trainer_reward_"
# Keys of RewardClient.metrics() that only grow; every other key is a gauge.
_COUNTERS = {"calls", "completions", "rewarded", "failed", "retries", "failovers", "circuit_opens",
             "circuit_rejections", "format_violations"}
# A reward call of a step: a few judged pairs (fast) to many cot answers under load.
_LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640)


class _ClientCollector:
    def __init__(self, client: RewardClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        for key, value in self.client.metrics().items():
            name = key.removeprefix("reward_client/")
            if name.startswith("http_errors/"):
                continue  # one labelled family below
            if name in _COUNTERS:
                yield CounterMetricFamily(PREFIX + name, f"reward client: {name.replace('_', ' ')}", value=value)
            else:
                yield GaugeMetricFamily(PREFIX + name, f"reward client: {name.replace('_', ' ')} (last call)",
                                        value=value)
        errors = CounterMetricFamily(PREFIX + "http_errors", "failed attempts by kind", labels=["kind"])
        for kind, count in sorted(self.client.stats.http_errors.items()):
            errors.add_metric([str(kind)], float(count))
        yield errors


class RewardMetricsExporter:
    """Serves ``client``'s counters, the reward-call latency and the training step on ``port``."""

    def __init__(self, client: RewardClient, port: int, addr: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ClientCollector(client))
        self.latency = Histogram(PREFIX + "call_seconds", "wall time of one reward call (a step's rollouts)",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.step = Gauge("her_trainer_global_step", "the optimizer step the trainer is on",
                          registry=self.registry)
        self.server, self._thread = start_http_server(port, addr, registry=self.registry)
        self.port = self.server.server_port
        log.info("trainer metrics on http://%s:%d/metrics", addr, self.port)

    def callback(self) -> Any:
        """A TrainerCallback that keeps ``her_trainer_global_step`` current."""
        from transformers import TrainerCallback

        step = self.step

        class _StepGauge(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                step.set(state.global_step)

        return _StepGauge()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
