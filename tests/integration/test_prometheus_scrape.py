"""The shipped Prometheus config, alerts and dashboards against a real Prometheus scraping
the session's real server and worker.

A Prometheus (/usr/bin/prometheus; `apt-get install -y prometheus`, which .ci/run does) is
started on a free port with deploy/prometheus/prometheus.yml (targets pointed at the
session's ports, 1 s scrape and evaluation intervals) and the real alerts.yml. Traffic: a
small training job, an evaluation, Predicts (good ones, a malformed one, one to a name that
does not exist), feedback with wrong labels, and a job that fails on its inputs. Then every
dashboard expression and every alert expression is run through Prometheus's HTTP API.

Expected empty in this stack (everything else must return data):

- dashboards: ``EMPTY`` below (no shedding, no GPU on these machines); every other
  expression must return a finite value, and every legend must read without holes;
- alerts: all but FitserveAccuracyBelowEvaluation. The stack is healthy (its errors are the
  client's: INVALID_ARGUMENT, NOT_FOUND, a job failing INVALID_INPUTS), so each alert
  expression evaluates to nothing. FitserveAccuracyBelowEvaluation is the exception on
  purpose: the feedback says the version is right on none of 64 rows, below 90% of its
  evaluated accuracy, so its expression has a result and the alert is pending (its ``for``
  is 15 minutes), as for a version bad from its first request.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fitserve
from service.config import Settings
from service.launch.ready import wait_ready
from tests import deploy_scripts
from tests.conftest import RunningServer, worker_ready_file
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = Path("/usr/bin/prometheus")
MODEL = "promscrape-mlp"
RATE_INTERVAL = "2m"  # longer than this test: every window holds all its traffic
WAIT = 60.0
EMPTY = {
    ("serving.json", "Refused Predicts: shed and batcher rejections", "A"): (
        "nothing is shed: the overloaded label set appears at the first shed call"
    ),
    ("training.json", "GPU utilisation", "A"): "no GPU (NVML) on these machines",
    ("training.json", "GPU memory used", "A"): "no GPU on these machines",
}
PENDING = {"FitserveAccuracyBelowEvaluation"}  # see the module docstring


preview = deploy_scripts.load("preview")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def query(base: str, expr: str) -> list[Any]:
    result: list[Any] = preview.api(base, "/api/v1/query", query=expr)["result"]
    return result


def until(check: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.5)  # polling Prometheus, which scrapes every second


def config(server_port: int, worker_port: int) -> str:
    """deploy/prometheus/prometheus.yml, pointed at this stack."""
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    replaced = {
        "scrape_interval: 15s": "scrape_interval: 1s",
        "evaluation_interval: 15s": "evaluation_interval: 1s",
        "- alerts.yml": f"- {DEPLOY / 'prometheus' / 'alerts.yml'}",
        '"127.0.0.1:9464"': f'"127.0.0.1:{server_port}"',
        '"127.0.0.1:9465"': f'"127.0.0.1:{worker_port}"',
        '"127.0.0.1:9093"': '"127.0.0.1:1"',  # an Alertmanager nobody runs: refused
    }
    for old, new in replaced.items():
        assert old in text, f"prometheus.yml has no {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def prometheus(
    server: RunningServer,
    worker: subprocess.Popen[bytes],
    settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    if not PROMETHEUS.exists():
        pytest.skip("no /usr/bin/prometheus: apt-get install -y prometheus (as .ci/run does)")
    (ready,) = wait_ready([worker_ready_file(settings)], [("worker", worker)])
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(config(server.metrics_port, ready.port))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def started() -> bool:
        assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        until(started, "Prometheus ready", timeout=30)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class Traffic:
    base: str
    version: int


@pytest.fixture(scope="module")
def traffic(
    prometheus: str, server: RunningServer, digits: tuple[np.ndarray, np.ndarray]
) -> Traffic:
    """A train, an evaluation, Predicts good and bad, wrong feedback, a failed job; back
    once Prometheus has scraped all of it."""
    x, y = digits

    def scraped(expr: str) -> bool:
        return bool(query(prometheus, expr))

    # Prometheus's rate() counts from a series' first sample: every series the panels
    # read is scraped once before the events that move it
    until(lambda: scraped('fitserve_training_epoch_duration_seconds_count{kind="train"}'), "worker")
    until(lambda: scraped('fitserve_job_run_seconds_count{kind="TRAIN"}'), "job statistics")
    with fitserve.Client(server.target, timeout=120) as client:
        ds = client.upload_dataset("promscrape-digits", x=x[:64], y=y[:64])
        job = client.train(
            MODEL,
            layers=MLP_LAYERS,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            dataset=ds,
            epochs=2,
            batch_size=32,
        )
        bad_inputs = client.upload_dataset(
            "promscrape-bad", x=np.zeros((8, 27, 28), np.float32), y=np.arange(8) % 10
        )
        failing = client.train(
            "promscrape-failing",
            layers=MLP_LAYERS,
            loss="sparse_categorical_crossentropy",
            dataset=bad_inputs,
        )
        version = job.wait(timeout=120).model_version
        evaluation = client.evaluate(MODEL, dataset=ds, version=version)
        first = client.predict_full(MODEL, x[:8], version=version)  # loads the version
        # its series (created as it loads or at its first call) scraped before the rest
        until(
            lambda: (
                scraped(f'fitserve_feedback_rows_total{{model="{MODEL}"}} == 0')
                and scraped(f'fitserve_predict_batch_size_count{{model="{MODEL}"}}')
            ),
            "the version's series",
        )
        answers = [first] + [
            client.predict_full(MODEL, x[i * 8 : (i + 1) * 8], version=version) for i in range(1, 8)
        ]
        for answer in answers:  # 64 rows, each fed back with a label the model did not predict
            predicted = np.asarray(next(iter(answer.outputs.values()))).argmax(axis=1)
            client.feedback(answer.request_id, (predicted + 1) % 10)
        with pytest.raises(fitserve.InvalidArgumentError):  # the client's mistake
            client.predict(MODEL, np.zeros((1, 28, 5), np.float32), version=version)
        with pytest.raises(fitserve.NotFoundError):  # counted with model=""
            client.predict("promscrape-no-such-model", x[:1])
        evaluation.wait(timeout=120)
        with pytest.raises(fitserve.JobFailedError):
            failing.wait(timeout=120)

    until(lambda: scraped(f'fitserve_model_evaluation_metric{{model="{MODEL}"}}'), "evaluation")
    until(lambda: scraped(f'fitserve_feedback_rows_total{{model="{MODEL}"}} >= 64'), "feedback")
    until(
        lambda: scraped('max(fitserve_jobs_failed_total{reason="INVALID_INPUTS"}) > 0'), "failure"
    )
    until(
        lambda: scraped('fitserve_rpc_requests_total{method="Predict", code="NOT_FOUND"} > 0'),
        "the NOT_FOUND Predict",
    )
    until(lambda: scraped("max(fitserve_worker_jobs_running) == 0"), "the worker idle")
    time.sleep(3)  # a few more scrapes and rule evaluations after the last event
    return Traffic(prometheus, version)


def dashboard_targets() -> list[tuple[str, str, str, str]]:
    found = []
    for path in sorted((DEPLOY / "grafana").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in preview.panels(board):
            for target in panel["targets"]:
                found.append((path.name, panel["title"], target["refId"], target["expr"]))
    return found


def test_every_dashboard_expression_parses_and_returns_data(traffic: Traffic) -> None:
    variables = {"model": MODEL, "version": str(traffic.version)}
    empty, failed = [], []
    for board, title, ref, expr in dashboard_targets():
        expanded = preview.expand(expr, variables, RATE_INTERVAL)
        try:
            result = query(traffic.base, expanded)
        except (RuntimeError, urllib.error.HTTPError) as exc:  # a parse or evaluation error
            failed.append(f"{board} / {title} / {ref}: {exc}")
            continue
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        if not finite and (board, title, ref) not in EMPTY:  # NaN: a quantile of nothing
            empty.append(f"{board} / {title} / {ref}: {expanded} -> {result}")
        if result and (board, title, ref) in EMPTY:
            empty.append(f"{board} / {title} / {ref} has data; drop it from EMPTY")
    assert failed == []
    assert empty == []


def test_every_legend_reads_well_with_every_label_value(traffic: Traffic) -> None:
    """With every variable at All (names that resolve to nothing included), no legend has a
    hole: no "{{", no doubled space, no "v" without a version."""
    holes = []
    for path in sorted((DEPLOY / "grafana").glob("*.json")):
        for panel in preview.panels(json.loads(path.read_text())):
            for target in panel["targets"]:
                expr = preview.expand(target["expr"], {}, RATE_INTERVAL)
                for series in query(traffic.base, expr):
                    name = preview.legend(target["legendFormat"], series["metric"]).strip()
                    if "{{" in name or "  " in name or re.search(r"\bv(\s|$)", name):
                        holes.append(f"{path.name} / {panel['title']}: {name!r}")
    assert holes == []
    # every template variable's values query answers with this stack's labels
    loaded = query(traffic.base, "fitserve_model_version_loaded")
    assert MODEL in {m["metric"]["model"] for m in loaded}
    queues = {m["metric"]["queue"] for m in query(traffic.base, "fitserve_queue_length")}
    assert queues == {"train", "cpu"}


def test_every_alert_expression_evaluates_and_the_right_alerts_are_quiet(
    traffic: Traffic,
) -> None:
    groups = preview.api(traffic.base, "/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    names = {rule["name"] for rule in rules}
    shipped = set(re.findall(r"- alert: (\w+)", (DEPLOY / "prometheus" / "alerts.yml").read_text()))
    assert names == shipped
    assert names >= PENDING
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        result = query(traffic.base, rule["query"])
        if rule["name"] in PENDING:
            assert [r["metric"]["model"] for r in result] == [MODEL], rule["name"]
            assert rule["state"] == "pending", rule["name"]
        else:
            assert result == [], f"{rule['name']} has a result in a healthy stack: {result}"
            assert rule["state"] == "inactive", rule["name"]
    # the metrics every alert names are scraped (the alerts are not quiet for lack of them)
    for rule in rules:
        for name in set(re.findall(r"\bfitserve_[a-z_]+|\bup\b", rule["query"])):
            assert query(traffic.base, f"count({name})"), f"{rule['name']}: no {name} scraped"


def test_targets_are_up(traffic: Traffic) -> None:
    targets = preview.api(traffic.base, "/api/v1/targets")["activeTargets"]
    assert sorted((t["labels"]["job"], t["health"]) for t in targets) == [
        ("fitserve-server", "up"),
        ("fitserve-worker", "up"),
    ]


def test_dashboards_preview_renders_a_png_per_dashboard(traffic: Traffic, tmp_path: Path) -> None:
    """deploy/preview.py on this Prometheus (`make dashboards-preview` without a
    PROMETHEUS_URL runs this test with FITSERVE_DASHBOARDS_PREVIEW=deploy/preview)."""
    out = Path(os.environ.get("FITSERVE_DASHBOARDS_PREVIEW") or tmp_path)
    written = preview.preview(
        traffic.base,
        out,
        minutes=2,
        variables={"model": MODEL},
        rate_interval="30s",
    )
    assert sorted(p.name for p in written) == ["serving.png", "training.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 20_000


def test_a_version_that_fails_to_load_fires_its_alert_with_readable_texts(
    traffic: Traffic,
    server: RunningServer,
    settings: Settings,
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """Last (it leaves the stack unhealthy): a corrupt version fires FitserveModelLoadFailures
    (no `for`) and puts FitservePredictServerErrors in pending, their texts rendered from
    the real labels."""
    name = "promscrape-corrupt"
    x, y = digits
    with fitserve.Client(server.target, timeout=120) as client:
        ds = client.upload_dataset(f"{name}-data", x=x[:32], y=y[:32])
        job = client.train(
            name, layers=MLP_LAYERS, loss="sparse_categorical_crossentropy", dataset=ds, epochs=1
        )
        version = job.wait(timeout=120).model_version
        pb = settings.models_dir / name / str(version) / "saved_model.pb"
        pb.write_bytes(b"not a SavedModel \xff\xfe" * 64)
        with pytest.raises(fitserve.DataLossError):
            client.predict(name, x[:1], version=version)
        # rate() starts from the series' first sample, which already counts that call (its
        # series are created as the version loads): the next calls are what it sees
        until(
            lambda: bool(
                query(
                    traffic.base,
                    f'fitserve_predict_requests_total{{model="{name}", code="DATA_LOSS"}}',
                )
            ),
            "the failed call scraped",
        )
        for _ in range(3):
            with pytest.raises(fitserve.DataLossError):  # the failure is remembered
                client.predict(name, x[:1], version=version)

    def alerts() -> dict[str, Any]:
        found = preview.api(traffic.base, "/api/v1/alerts")["alerts"]
        return {a["labels"]["alertname"]: a for a in found}

    until(
        lambda: alerts().get("FitserveModelLoadFailures", {}).get("state") == "firing",
        "FitserveModelLoadFailures firing",
    )
    until(lambda: "FitservePredictServerErrors" in alerts(), "FitservePredictServerErrors")
    now = alerts()
    load = now["FitserveModelLoadFailures"]
    instance = f"127.0.0.1:{server.metrics_port}"
    assert load["labels"] == {
        "alertname": "FitserveModelLoadFailures",
        "instance": instance,
        "reason": "DATA_LOSS",
        "severity": "ticket",
    }
    assert (
        load["annotations"]["summary"] == f"{instance} failed to load a model version (DATA_LOSS)"
    )
    assert load["annotations"]["runbook"].endswith("docs/runbook.md#fitservemodelloadfailures")
    errors = now["FitservePredictServerErrors"]
    assert errors["state"] == "pending"  # for 10 minutes
    assert errors["labels"]["model"] == name
    assert errors["annotations"]["summary"] == (
        f"100% of Predict calls to {name} version {version} fail with a server error"
    )
