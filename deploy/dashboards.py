# ruff: noqa: E501  (PromQL expressions read better on one line)
"""Writes the Grafana dashboards deploy/grafana/serving.json and training.json.

The dashboards are generated so every panel follows the same rules (one unit per panel,
``$__rate_interval`` windows, legends naming their labels, ids unique); edit the panels
here and run ``python deploy/dashboards.py`` (tests/unit/deploy/test_dashboards.py fails
when the JSON files differ from what this writes).

Aggregation: job statistics and queue gauges are the same on every api replica, so they
are taken with ``max by``; per-process counters are summed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GRAFANA = Path(__file__).resolve().parent / "grafana"
RI = "$__rate_interval"
SERVER = 'job="fitserve-server", instance=~"$instance"'
WORKER = 'job="fitserve-worker", instance=~"$instance"'
MV = 'model=~"$model", version=~"$version"'


def target(expr: str) -> str:
    """``expr`` with a label ``target``: "model vN", or "(unresolved name)" for the series
    of names that resolve to no version (empty model and version)."""
    joined = f'label_join({expr}, "target", " v", "model", "version")'
    return f'label_replace({joined}, "target", "(unresolved name)", "target", " v")'


def q(expr: str, legend: str) -> dict[str, str]:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, by: str, sel: str, legend: str, agg: str = "sum") -> list[Any]:
    """p50 and p99 of a histogram, by ``by``."""
    return [
        q(
            f"histogram_quantile({p}, {agg} by (le, {by}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
            f"p{round(p * 100)} {legend}",
        )
        for p in (0.5, 0.99)
    ]


def panel(title: str, unit: str, targets: list[Any], description: str = "", **extra: Any) -> Any:
    return {"title": title, "unit": unit, "targets": targets, "description": description, **extra}


def row(title: str) -> Any:
    return {"row": title}


SERVING: list[Any] = [
    row("RPCs"),
    panel(
        "RPC rate by code",
        "reqps",
        [q(f"sum by (code) (rate(fitserve_rpc_requests_total{{{SERVER}}}[{RI}]))", "{{code}}")],
        "Every call ended, every method, by gRPC status code.",
    ),
    panel(
        "Server errors by method",
        "reqps",
        [
            q(
                f'sum by (method, code) (rate(fitserve_rpc_requests_total{{{SERVER}, code=~"INTERNAL|UNAVAILABLE|DATA_LOSS"}}[{RI}]))',
                "{{method}} {{code}}",
            ),
            q(
                f'sum(rate(fitserve_predict_rejections_total{{{SERVER}, reason="deadline"}}[{RI}]))',
                "Predict expired in the batcher (DEADLINE_EXCEEDED)",
            ),
        ],
        "What FitserveRpcServerErrors and FitservePredictServerErrors page on.",
    ),
    panel(
        "Client errors by method",
        "reqps",
        [
            q(
                f'sum by (method, code) (rate(fitserve_rpc_requests_total{{{SERVER}, code=~"CANCELLED|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|PERMISSION_DENIED|FAILED_PRECONDITION|UNAUTHENTICATED|RESOURCE_EXHAUSTED"}}[{RI}]))',
                "{{method}} {{code}}",
            )
        ],
        "Codes of the callers' making (and RESOURCE_EXHAUSTED: refused calls); no page.",
    ),
    panel(
        "Server error ratio",
        "percentunit",
        [
            q(
                f'sum(rate(fitserve_rpc_requests_total{{{SERVER}, code=~"INTERNAL|UNAVAILABLE|DATA_LOSS"}}[{RI}])) / sum(rate(fitserve_rpc_requests_total{{{SERVER}}}[{RI}]))',
                "server errors / calls",
            )
        ],
    ),
    panel(
        "RPC latency by method",
        "s",
        quantiles("fitserve_rpc_duration_seconds", "method", SERVER, "{{method}}"),
        "Handler start to end, every code.",
    ),
    row("Predict"),
    panel(
        "Predict rate by version and code",
        "reqps",
        [
            q(
                target(
                    f"sum by (model, version, code) (rate(fitserve_predict_requests_total{{{SERVER}, {MV}}}[{RI}]))"
                ),
                "{{target}} {{code}}",
            )
        ],
        "(unresolved name): Predicts naming no version that exists.",
    ),
    panel(
        "Predict latency by version (OK calls)",
        "s",
        quantiles(
            "fitserve_predict_duration_seconds",
            "model, version",
            f'{SERVER}, {MV}, code="OK"',
            "{{model}} v{{version}}",
        ),
        "FitservePredictLatencyHigh: p99 over 100 ms for 10 minutes.",
    ),
    panel(
        "Batch queue wait and compute (p99)",
        "s",
        [
            q(
                f"histogram_quantile(0.99, sum by (le, model, version) (rate(fitserve_predict_queue_wait_seconds_bucket{{{SERVER}, {MV}}}[{RI}])))",
                "queue wait {{model}} v{{version}}",
            ),
            q(
                f"histogram_quantile(0.99, sum by (le, model, version) (rate(fitserve_predict_compute_seconds_bucket{{{SERVER}, {MV}}}[{RI}])))",
                "compute {{model}} v{{version}}",
            ),
        ],
    ),
    panel(
        "Batch size (mean)",
        "short",
        [
            q(
                f"sum by (model, version) (rate(fitserve_predict_batch_size_sum{{{SERVER}, {MV}}}[{RI}])) / sum by (model, version) (rate(fitserve_predict_batch_size_count{{{SERVER}, {MV}}}[{RI}]))",
                "rows {{model}} v{{version}}",
            ),
            q(
                f"sum by (model, version) (rate(fitserve_predict_batch_requests_sum{{{SERVER}, {MV}}}[{RI}])) / sum by (model, version) (rate(fitserve_predict_batch_requests_count{{{SERVER}, {MV}}}[{RI}]))",
                "requests {{model}} v{{version}}",
            ),
        ],
        "Rows and requests per model call.",
    ),
    panel(
        "Queued and in flight",
        "short",
        [
            q(
                f"sum by (model, version) (fitserve_predict_queue_depth{{{SERVER}, {MV}}})",
                "queued {{model}} v{{version}}",
            ),
            q(
                f"sum by (model, version) (fitserve_predict_in_flight{{{SERVER}, {MV}}})",
                "in flight {{model}} v{{version}}",
            ),
            q(f"sum(fitserve_grpc_queued_calls{{{SERVER}}})", "in gRPC's queue (all calls)"),
        ],
    ),
    panel(
        "Refused Predicts: shed and batcher rejections",
        "reqps",
        [
            q(
                f'sum by (instance) (rate(fitserve_predict_rejections_total{{{SERVER}, reason="overloaded"}}[{RI}]))',
                "shed (overloaded) {{instance}}",
            ),
            q(
                f'sum by (model, version, reason) (rate(fitserve_predict_rejections_total{{{SERVER}, {MV}, reason!="overloaded"}}[{RI}]))',
                "{{reason}} {{model}} v{{version}}",
            ),
        ],
        "Shed calls carry no model (refused before parsing): shown whatever model is selected.",
    ),
    panel(
        "gRPC queue wait",
        "s",
        [q(f"max by (instance) (fitserve_grpc_queue_wait_seconds{{{SERVER}}})", "{{instance}}")],
        "Shedding starts past FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS.",
    ),
    row("Models"),
    panel(
        "Accuracy per version: live (feedback) and evaluated",
        "percentunit",
        [
            q(
                f"sum by (model, version, output) (increase(fitserve_feedback_correct_total{{{SERVER}, {MV}}}[{RI}])) / sum by (model, version, output) (increase(fitserve_feedback_rows_total{{{SERVER}, {MV}}}[{RI}]))",
                "live {{model}} v{{version}} {{output}}",
            ),
            q(
                # the dataset label is a content id (sha256:...): its first 8 hex digits name it
                f'label_replace(max by (model, version, dataset, metric) (fitserve_model_evaluation_metric{{{SERVER}, {MV}, metric=~".*accuracy"}}), "dataset", "$1", "dataset", "sha256:([0-9a-f]{{8}}).*")',
                "evaluated {{model}} v{{version}} {{metric}} on {{dataset}}",
            ),
        ],
        "Live: correct / rows fed back in the window. Evaluated: the latest Evaluate job.",
    ),
    panel(
        "Model loads and failures",
        "short",
        [
            q(
                f"sum by (model, version, result) (increase(fitserve_model_loads_total{{{SERVER}, {MV}}}[{RI}]))",
                "{{result}} {{model}} v{{version}}",
            ),
            q(
                f"sum by (reason) (increase(fitserve_model_load_failures_total{{{SERVER}}}[{RI}]))",
                "failed: {{reason}} (any version)",
            ),
        ],
    ),
    panel(
        "Loaded versions",
        "short",
        [
            q(
                f"max by (model, version) (fitserve_model_version_loaded{{{SERVER}, {MV}}})",
                "{{model}} v{{version}}",
            )
        ],
    ),
    panel(
        "Loaded model bytes",
        "bytes",
        [
            q(
                f"sum by (model, version) (fitserve_model_version_loaded_bytes{{{SERVER}, {MV}}})",
                "{{model}} v{{version}}",
            )
        ],
    ),
    row("Processes and Redis"),
    panel(
        "Server CPU (1 = one core)",
        "percentunit",
        [
            q(
                f"sum by (instance) (rate(process_cpu_seconds_total{{{SERVER}}}[{RI}]))",
                "{{instance}}",
            )
        ],
    ),
    panel(
        "Server resident memory",
        "bytes",
        [q(f"sum by (instance) (process_resident_memory_bytes{{{SERVER}}})", "{{instance}}")],
    ),
    panel(
        "Redis up",
        "none",
        [q(f"min by (instance) (fitserve_redis_up{{{SERVER}}})", "{{instance}}")],
        "1: the last PING answered.",
    ),
    panel(
        "Redis PING latency",
        "s",
        quantiles("fitserve_redis_ping_seconds", "instance", SERVER, "{{instance}}"),
    ),
]

TRAINING: list[Any] = [
    row("Queues"),
    panel(
        "Jobs waiting per queue",
        "short",
        [q('max by (queue) (fitserve_queue_length{queue=~"$queue"})', "{{queue}}")],
        "The same on every api replica: max, not sum.",
    ),
    panel(
        "Oldest queued job's wait",
        "s",
        [q('max by (queue) (fitserve_job_oldest_queued_seconds{queue=~"$queue"})', "{{queue}}")],
        "FitserveQueueBackingUp: over 30 minutes.",
    ),
    panel(
        "Workers per queue",
        "short",
        [q('max by (queue) (fitserve_queue_workers{queue=~"$queue"})', "{{queue}}")],
        "Live heartbeat keys. FitserveQueueWithoutWorker: 0 while jobs wait.",
    ),
    panel(
        "Job queue wait",
        "s",
        quantiles(
            "fitserve_job_queue_wait_seconds", "kind", 'job="fitserve-server"', "{{kind}}", "max"
        ),
        "Queued to started, of the jobs that started in the window.",
    ),
    row("Jobs"),
    panel(
        "Jobs submitted and ended",
        "short",
        [
            q(
                f'sum by (kind) (increase(fitserve_jobs_submitted_total{{job="fitserve-server"}}[{RI}]))',
                "submitted {{kind}}",
            ),
            q(
                f'max by (kind, outcome) (increase(fitserve_jobs_finished_total{{job="fitserve-server"}}[{RI}]))',
                "{{outcome}} {{kind}}",
            ),
        ],
    ),
    panel(
        "Failed jobs by reason",
        "short",
        [
            q(
                f'max by (kind, reason) (increase(fitserve_jobs_failed_total{{job="fitserve-server"}}[{RI}])) > 0',
                "{{reason}} {{kind}}",
            )
        ],
        "Reasons with failures in the window only (every reason is exported at 0).",
    ),
    panel(
        "Jobs running",
        "short",
        [
            q('max by (kind) (fitserve_jobs_running{job="fitserve-server"})', "{{kind}}"),
            q(f"sum by (worker) (fitserve_worker_jobs_running{{{WORKER}}})", "worker {{worker}}"),
        ],
    ),
    panel(
        "Job run time",
        "s",
        quantiles("fitserve_job_run_seconds", "kind", 'job="fitserve-server"', "{{kind}}", "max"),
        "Started to ended, of the jobs that ended in the window.",
    ),
    row("Training"),
    panel(
        "Epoch duration",
        "s",
        quantiles("fitserve_training_epoch_duration_seconds", "kind", WORKER, "{{kind}}"),
    ),
    panel(
        "Step duration",
        "s",
        quantiles("fitserve_training_step_duration_seconds", "instance", WORKER, "{{instance}}"),
    ),
    panel(
        "Training throughput (samples/s, last epoch)",
        "short",
        [
            q(
                f"max by (instance) (fitserve_training_samples_per_second{{{WORKER}}})",
                "{{instance}}",
            )
        ],
    ),
    panel(
        "GPUs",
        "short",
        [q(f"max by (instance) (fitserve_gpu_devices{{{WORKER}}})", "{{instance}}")],
        "GPUs TensorFlow sees; 0 on a CPU worker.",
    ),
    panel(
        "GPU utilisation",
        "percentunit",
        [
            q(
                f"max by (instance, device) (fitserve_gpu_utilization_ratio{{{WORKER}}})",
                "{{instance}} GPU {{device}}",
            )
        ],
        "From NVML where pynvml is installed and finds GPUs; empty otherwise.",
    ),
    panel(
        "GPU memory used",
        "bytes",
        [
            q(
                f"max by (instance, device) (fitserve_gpu_memory_used_bytes{{{WORKER}}})",
                "{{instance}} {{device}}",
            )
        ],
        "Sampled at each epoch end; only where a GPU is present.",
    ),
    row("Workers"),
    panel(
        "Worker up",
        "none",
        [
            q(f"up{{{WORKER}}}", "scraped {{instance}}"),
            q(
                f'sum by (worker, queue) (fitserve_worker_up{{{WORKER}, queue=~"$queue"}})',
                "{{worker}} consumes {{queue}}",
            ),
        ],
    ),
    panel(
        "Worker CPU (1 = one core)",
        "percentunit",
        [
            q(
                f"sum by (instance) (rate(process_cpu_seconds_total{{{WORKER}}}[{RI}]))",
                "{{instance}}",
            )
        ],
        "The main process and its pool children.",
    ),
    panel(
        "Worker resident memory",
        "bytes",
        [q(f"sum by (instance) (process_resident_memory_bytes{{{WORKER}}})", "{{instance}}")],
    ),
    panel(
        "Worker Redis up",
        "none",
        [q(f"min by (instance) (fitserve_redis_up{{{WORKER}}})", "{{instance}}")],
    ),
]


def variable(name: str, query: str, label: str) -> Any:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": query,
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def dashboard(uid: str, title: str, panels: list[Any], variables: list[Any]) -> Any:
    out, next_id, x, y = [], 1, 0, 0
    source = {"type": "prometheus", "uid": "${datasource}"}
    for item in panels:
        if "row" in item:
            y += 0 if x == 0 else 8
            x = 0
            out.append(
                {
                    "id": next_id,
                    "type": "row",
                    "title": item["row"],
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            next_id, y = next_id + 1, y + 1
            continue
        targets = [
            dict(t, refId=chr(ord("A") + i), datasource=source)
            for i, t in enumerate(item["targets"])
        ]
        out.append(
            {
                "id": next_id,
                "type": "timeseries",
                "title": item["title"],
                "description": item["description"],
                "datasource": source,
                "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
                "fieldConfig": {
                    "defaults": {
                        "unit": item["unit"],
                        "min": 0,
                        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10},
                    },
                    "overrides": [],
                },
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
                "targets": targets,
            }
        )
        next_id += 1
        x += 8
        if x >= 24:
            x, y = 0, y + 8
    datasource = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
    }
    return {
        "uid": uid,
        "title": title,
        "tags": ["fitserve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [datasource, *variables]},
        "annotations": {"list": []},
        "panels": out,
    }


def dashboards() -> dict[str, Any]:
    """File name -> dashboard."""
    server = 'label_values(up{job="fitserve-server"}, instance)'
    worker = 'label_values(up{job="fitserve-worker"}, instance)'
    return {
        "serving.json": dashboard(
            "fitserve-serving",
            "fitserve: serving",
            SERVING,
            [
                variable("instance", server, "Server"),
                variable("model", "label_values(fitserve_model_version_loaded, model)", "Model"),
                variable(
                    "version",
                    'label_values(fitserve_model_version_loaded{model=~"$model"}, version)',
                    "Version",
                ),
            ],
        ),
        "training.json": dashboard(
            "fitserve-training",
            "fitserve: training",
            TRAINING,
            [
                variable("instance", worker, "Worker"),
                variable("queue", "label_values(fitserve_queue_length, queue)", "Queue"),
            ],
        ),
    }


def render(board: Any) -> str:
    return json.dumps(board, indent=2) + "\n"


def main() -> int:
    for name, board in dashboards().items():
        (GRAFANA / name).write_text(render(board))
        print(f"wrote {GRAFANA / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
