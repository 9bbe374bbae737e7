"""The dashboard and alert rules name only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service.metrics import EvaluationCollector, Metrics

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
NAME = re.compile(r"\bfitserve_[a-z_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def _exported() -> set[str]:
    registry = Metrics().registry
    registry.register(EvaluationCollector(list))
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def _referenced(text: str) -> set[str]:
    return set(NAME.findall(text))


@pytest.mark.parametrize("path", ["grafana/fitserve.json", "prometheus/alerts.yml"])
def test_every_metric_named_is_exported(path: str) -> None:
    exported = _exported()
    exported |= {name + suffix for name in exported for suffix in SUFFIXES}
    referenced = _referenced((DEPLOY / path).read_text())
    assert referenced, f"{path} names no metric"
    assert sorted(referenced - exported) == []


def test_dashboard_is_valid_json_with_queries() -> None:
    dashboard = json.loads((DEPLOY / "grafana/fitserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    assert all(e.count("(") == e.count(")") for e in exprs)
