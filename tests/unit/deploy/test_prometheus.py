"""prometheus.yml and alerts.yml against the real promtool: the config and the rules
check clean, the rule unit tests (alerts_test.yml) pass, and every alert has a severity,
texts, a runbook section and a test where it fires."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RUNBOOK = ROOT / "docs" / "runbook.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).exists(),
    reason="promtool is not installed (apt-get install -y prometheus; .ci/run installs it)",
)


def promtool(*args: str) -> str:
    done = subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def alerts() -> list[dict[str, Any]]:
    """The alerts of alerts.yml, read from its layout (promtool checks the YAML; PyYAML is
    no dependency): name, labels and annotations of each."""
    text = (PROMETHEUS / "alerts.yml").read_text()
    found = []
    for block in re.split(r"^      - alert: ", text, flags=re.M)[1:]:
        name = block.split("\n", 1)[0].strip()
        labels = re.search(r"^        labels: \{(.*)\}$", block, flags=re.M)
        notes = re.findall(r'^          (\w+): "(.*)"$', block, flags=re.M)
        found.append(
            {
                "alert": name,
                "labels": dict(pair.split(": ") for pair in labels.group(1).split(", "))
                if labels
                else {},
                "annotations": dict(notes),
            }
        )
    return found


@needs_promtool
def test_config_checks_clean() -> None:
    output = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in output
    assert "WARNING" not in output.upper()


@needs_promtool
def test_rules_check_clean() -> None:
    output = promtool("check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(alerts())} rules found" in output
    assert "WARNING" not in output.upper()


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_severity_texts_and_a_runbook_section() -> None:
    anchors = {
        heading.strip().lower()
        for heading in re.findall(r"^## (.+)$", RUNBOOK.read_text(), flags=re.M)
    }
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        notes = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(notes), name
        link = re.search(r"docs/runbook\.md#([a-z0-9-]+)$", notes["runbook"])
        assert link, f"{name}: its runbook line must end with docs/runbook.md#<section>"
        assert link.group(1) == name.lower(), name
        assert link.group(1) in anchors, f"{name}: no section {link.group(1)} in docs/runbook.md"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    text = (PROMETHEUS / "alerts_test.yml").read_text()
    cases = re.findall(r"^        alertname: (\w+)\n(        exp_alerts:)?", text, flags=re.M)
    firing = {name for name, expected in cases if expected}
    quiet = {name for name, expected in cases if not expected}
    names = {rule["alert"] for rule in alerts()}
    assert sorted(names - firing) == []
    assert sorted(names - quiet) == []


def test_prometheus_yml_scrapes_servers_and_workers_and_alerts() -> None:
    text = (PROMETHEUS / "prometheus.yml").read_text()
    jobs = re.findall(
        r"- job_name: ([\w-]+)\n\s+static_configs:\n\s+- targets: \[\"([^\"]+)\"\]", text
    )
    assert jobs == [("fitserve-server", "127.0.0.1:9464"), ("fitserve-worker", "127.0.0.1:9465")]
    assert re.search(r"^rule_files:\n  - alerts.yml$", text, flags=re.M)
    assert re.search(
        r"^alerting:\n  alertmanagers:\n(.*\n)*.*targets: \[\"[^\"]+:9093\"\]", text, flags=re.M
    )
