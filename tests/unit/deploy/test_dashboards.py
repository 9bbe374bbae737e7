"""Every Grafana dashboard in deploy/grafana (and the alert rules) is well formed and names
only metrics fitserve defines and documents."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from service.job_metrics import _queue_families, families, reasons
from service.metrics import EvaluationCollector, Metrics, TrainingMetrics
from tests import deploy_scripts

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))
NAME = re.compile(r"\b(?:fitserve|process|python)_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")
UNITS = {"s", "reqps", "percentunit", "bytes", "short", "none"}
RANGE = re.compile(
    r"\b(rate|increase|irate|delta|[a-z]+_over_time)\(([^()]*(?:\([^()]*\))*[^()]*)\[([^\]]+)\]"
)
# PromQL functions and keywords that look like names
KEYWORDS = {"by", "without", "on", "group_left", "group_right", "and", "or", "unless"}


def _worker_names() -> set[str]:
    """What the worker's main process adds (worker.metrics._WorkerCollector)."""
    from worker.metrics import _WorkerCollector

    class Worker:
        hostname, queues = "w", ["train"]

        class redis_up:  # noqa: N801  # stands for _LastValue
            value = 1.0

        def jobs_running(self) -> int:
            return 0

    names = {family.name for family in _WorkerCollector(Worker()).collect()}  # type: ignore[arg-type]
    return names | {"fitserve_gpu_utilization_ratio"}  # only where NVML finds GPUs


def _defined() -> set[str]:
    """Every sample name fitserve's code defines: server, job, queue, training, worker."""
    registry = Metrics().registry
    registry.register(EvaluationCollector(list))
    training = TrainingMetrics(CollectorRegistry())
    names = {"fitserve_job_metrics_up"} | _worker_names()
    for family in [
        *registry.collect(),
        *training.registry.collect(),
        *families({}, reasons()),
        *_queue_families(),
    ]:
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names | {n + s for n in names for s in SUFFIXES}


def _documented() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    names = set(re.findall(r"`(fitserve_[a-z0-9_]+)`", text))
    return names | {n + s for n in names for s in SUFFIXES}


def targets(board: Any) -> Iterator[tuple[Any, Any]]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def referenced(text: str) -> set[str]:
    return {n for n in NAME.findall(text) if n not in KEYWORDS}


@pytest.fixture(scope="module")
def defined() -> set[str]:
    return _defined()


def test_there_are_the_two_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == ["serving.json", "training.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    board = json.loads(path.read_text())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in board["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        title = panel["title"]
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit in UNITS, f"{title}: one unit per panel, from {sorted(UNITS)}"
        assert not panel["fieldConfig"]["overrides"], f"{title}: no per-series units"
        assert panel["targets"], title
        for target in panel["targets"]:
            expr, legend = target.get("expr", ""), target.get("legendFormat", "")
            assert expr.strip(), f"{title}: a target without expr"
            assert legend.strip(), f"{title}: {expr} has no legendFormat"
            assert legend != "__auto", f"{title}: {expr} has no legendFormat"
            assert expr.count("(") == expr.count(")"), expr
            for function, _inner, window in RANGE.findall(expr):
                assert window == "$__rate_interval", f"{title}: {function}(...[{window}])"
            labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            grouped = set(re.findall(r"\w+", " ".join(re.findall(r"by \(([^)]*)\)", expr))))
            grouped |= set(re.findall(r'\),\s*"(\w+)"', expr))  # label_join/label_replace
            assert labels <= grouped | {"instance"}, (
                f"{title}: legend {legend} names {labels - grouped}"
            )


@pytest.mark.parametrize(
    "path", [*DASHBOARDS, DEPLOY / "prometheus" / "alerts.yml"], ids=lambda p: p.name
)
def test_every_metric_named_is_defined_and_documented(path: Path, defined: set[str]) -> None:
    if path.suffix == ".json":
        text = "\n".join(t["expr"] for _, t in targets(json.loads(path.read_text())))
    else:
        text = "\n".join(re.findall(r"expr: (.*(?:\n {10,}.*)*)", path.read_text()))
    names = referenced(text)
    assert names, f"{path.name} names no metric"
    assert sorted(names - defined) == [], "not defined in the code"
    fitserve = {n for n in names if n.startswith("fitserve_")}
    assert sorted(fitserve - _documented()) == [], "not in docs/metrics.md"


def test_dashboards_are_what_the_generator_writes() -> None:
    generator = deploy_scripts.load("dashboards")
    for name, board in generator.dashboards().items():
        written = (DEPLOY / "grafana" / name).read_text()
        assert written == generator.render(board), f"run: python deploy/dashboards.py ({name})"
