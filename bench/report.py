"""Ratios against the targets listed in bench/README.md, the summary table, JSON and plots."""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Check:
    """One row of the summary: a measured value against its target."""

    case: str
    value: float | None
    op: str  # ">=" or "<="
    target: float
    unit: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "MISS (no data)"
        ok = self.value >= self.target if self.op == ">=" else self.value <= self.target
        return "PASS" if ok else "MISS"


def _at(sweep: list[dict[str, Any]], callers: int) -> dict[str, Any]:
    return next(r for r in sweep if r["callers"] == callers)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def serving_checks(r: dict[str, Any]) -> list[Check]:
    fit, echo, naive = (r["sweep"][k] for k in ("fitserve", "echo", "naive"))
    f64, e64, n64 = _at(fit, 64), _at(echo, 64), _at(naive, 64)
    f1, n1 = _at(fit, 1), _at(naive, 1)
    over, switch = r["overload"], r["alias_switch"]
    switch_failed = sum(switch["errors"].values())
    checks = [
        Check(
            "64 callers, 1 row: fitserve rps / transport ceiling",
            _ratio(f64["rps"], e64["rps"]),
            ">=",
            0.90,
        ),
        Check(
            "64 callers, 1 row: fitserve rps / naive server",
            _ratio(f64["rps"], n64["rps"]),
            ">=",
            2.5,
        ),
        Check(
            "64 callers, 1 row: fitserve p99 / transport ceiling p99",
            _ratio(f64["p99_ms"], e64["p99_ms"]),
            "<=",
            1.5,
        ),
        Check(
            "64 callers, 1 row: fitserve p99 / fitserve p50",
            _ratio(f64["p99_ms"], f64["p50_ms"]),
            "<=",
            1.5,
        ),
        Check(
            "1 caller, 1 row: fitserve p50 - naive p50",
            f1["p50_ms"] - n1["p50_ms"],
            "<=",
            0.15,
            " ms",
        ),
        Check(
            "16 callers, 512 rows: fitserve samples/s / transport ceiling",
            _ratio(
                r["rows512"]["fitserve"]["samples_per_s"], r["rows512"]["echo"]["samples_per_s"]
            ),
            ">=",
            0.80,
        ),
        Check(
            "16 callers, 512 rows: fitserve samples/s / naive server",
            _ratio(
                r["rows512"]["fitserve"]["samples_per_s"], r["rows512"]["naive"]["samples_per_s"]
            ),
            ">=",
            1.0,
        ),
        Check(
            "overload 256 callers: requests rejected with RESOURCE_EXHAUSTED",
            float(over["errors"].get("RESOURCE_EXHAUSTED", 0)),
            ">=",
            1.0,
        ),
        Check(
            "overload 256 callers: accepted p99 / 64-caller p99",
            _ratio(over["p99_ms"], f64["p99_ms"]),
            "<=",
            2.0,
        ),
        Check(
            "overload 256 callers: server RSS growth",
            over["rss_after_mb"] - over["rss_before_mb"],
            "<=",
            50.0,
            " MB",
        ),
        Check(
            "alias switch every 2 s, 64 callers: failed requests", float(switch_failed), "<=", 0.0
        ),
        Check(
            "alias switch: p99 / p99 without switches",
            _ratio(switch["p99_ms"], f64["p99_ms"]),
            "<=",
            1.5,
        ),
    ]
    if "latency_target" in r:
        checks += _latency_target_checks(r["latency_target"], f64)
    if "auth" in r:
        checks += auth_checks(r["auth"])
    return checks


AUTH_REFUSALS = ("UNAUTHENTICATED", "PERMISSION_DENIED")
AuthRound = dict[str, Any]  # {"off": [64-caller, 1-caller results], "on": [...], "first": ...}


def _paired(rounds: list[AuthRound], of: Callable[[AuthRound], float | None]) -> float | None:
    """The median over rounds of one paired comparison (None if any round has no data)."""
    values = [of(r) for r in rounds]
    if not values or any(v is None for v in values):
        return None
    return statistics.median(v for v in values if v is not None)


def cpu_per_call_us(result: dict[str, Any]) -> float | None:
    """The server's CPU microseconds per call of the measured window (answered or refused:
    a refusal costs CPU too)."""
    calls = result["ok"] + sum(result["errors"].values())
    cpu = result.get("server_cpu_s")
    return None if not calls or cpu is None else cpu / calls * 1e6


def _cpu_ratio(r: AuthRound) -> float | None:
    return _ratio(cpu_per_call_us(_at(r["on"], 64)), cpu_per_call_us(_at(r["off"], 64)))


def _gap_us(inprocess: dict[str, Any] | None) -> float | None:
    if not inprocess:
        return None
    on, off = inprocess.get("on_us"), inprocess.get("off_us")
    return None if on is None or off is None else float(on - off)


def _p50_gap(r: AuthRound) -> float | None:
    on, off = _at(r["on"], 1)["p50_ms"], _at(r["off"], 1)["p50_ms"]
    return None if on is None or off is None else on - off


def auth_checks(a: dict[str, Any]) -> list[Check]:
    """Auth on against auth off (bench.serving._auth): what the token check costs Predict,
    each value the median of the paired rounds; and that auth was really on."""
    rounds: list[AuthRound] = a["rounds"]
    refused = sum(  # shed calls (RESOURCE_EXHAUSTED) are the load's, not the token's
        x["errors"].get(code, 0) for r in rounds for x in r["on"] for code in AUTH_REFUSALS
    )
    return [
        Check(
            "auth on / auth off, 64 callers, 1 row: rps",
            _paired(rounds, lambda r: _ratio(_at(r["on"], 64)["rps"], _at(r["off"], 64)["rps"])),
            ">=",
            0.97,
        ),
        Check(
            "auth on - auth off, 1 caller, 1 row: p50", _paired(rounds, _p50_gap), "<=", 0.05, " ms"
        ),
        Check(
            "auth on / auth off, 64 callers: server CPU per call",
            _paired(rounds, _cpu_ratio),
            "<=",
            1.03,
        ),
        Check(
            "auth on - auth off, in-process token check: per call",
            _gap_us(a.get("inprocess")),
            "<=",
            10.0,
            " us",
        ),
        Check("auth on: calls with the predictor token refused", float(refused), "<=", 0.0),
        Check(
            "auth on: a call without a token refused UNAUTHENTICATED",
            float(a["without_token"] == "UNAUTHENTICATED"),
            ">=",
            1.0,
        ),
    ]


def _latency_target_checks(lt: dict[str, Any], f64: dict[str, Any]) -> list[Check]:
    """Our own targets (the project's targets have none for this mode): the callers' p99 under the
    target, and at least the throughput of the fixed default timeout."""
    x = lt["target_ms"]
    return [
        Check(
            f"latency target {x:g} ms, 64 callers: client p99 / target",
            _ratio(lt["p99_ms"], x),
            "<=",
            1.0,
        ),
        Check(
            f"latency target {x:g} ms, 64 callers: rps / default-timeout rps",
            _ratio(lt["rps"], f64["rps"]),
            ">=",
            1.0,
        ),
    ]


def training_checks(r: dict[str, Any]) -> list[Check]:
    plain, fs = r["plain"], r["fitserve"]
    steady = r["samples"] * (r["epochs"] - 1)
    plain_sps = steady / (plain["epoch_ends"][-1] - plain["epoch_ends"][0])
    fs_sps = steady / (fs["epoch_ends"][-1] - fs["epoch_ends"][0])
    plain_first_epoch = plain["epoch_ends"][0] - plain["fit_start"]
    start_latency = (fs["epoch_ends"][0] - fs["returned"]) - plain_first_epoch
    overhead = (fs["done"] - fs["called"]) - (plain["fit_end"] - plain["fit_start"])
    rss = r["rss"]["rss_mb"]
    return [
        Check("fit throughput: fitserve / plain script", fs_sps / plain_sps, ">=", 0.97),
        Check(
            "Train return -> first epoch starting (idle warm worker)",
            start_latency,
            "<=",
            1.0,
            " s",
        ),
        Check("whole job - plain fit time", overhead, "<=", 2.0, " s"),
        Check(
            "accuracy: |fitserve - plain| (percentage points)",
            abs(fs["accuracy"] - plain["accuracy"]) * 100,
            "<=",
            0.2,
            " pp",
        ),
        # The peak over the run, not the last sample: worker children are replaced.
        Check(
            f"{r['rss']['jobs']} consecutive jobs: worker RSS growth (peak)",
            max(rss) - rss[0],
            "<=",
            100.0,
            " MB",
        ),
    ]


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def table(checks: list[Check]) -> str:
    lines = [f"{'case':<66} {'measured':>12} {'target':>10}  result"]
    for c in checks:
        value = "n/a" if c.value is None else f"{c.value:.3f}{c.unit}"
        lines.append(
            f"{c.case:<66} {value:>12} {c.op + ' ' + format(c.target, 'g'):>10}  {c.verdict}"
        )
    return "\n".join(lines)


def save(name: str, results: dict[str, Any], checks: list[Check]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    rows = [
        {"case": c.case, "value": c.value, "target": f"{c.op} {c.target}", "result": c.verdict}
        for c in checks
    ]
    path.write_text(
        json.dumps({"machine": machine(), "checks": rows, "results": results}, indent=1)
    )
    return path


def plot_serving(r: dict[str, Any], quick: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = "-quick" if quick else ""
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (kind, sweep) in enumerate(r["sweep"].items()):
        callers = [s["callers"] for s in sweep]
        for pct, style in (("p50_ms", "-"), ("p99_ms", "--")):
            ax.plot(
                callers,
                [s[pct] for s in sweep],
                style,
                color=f"C{i}",
                marker="o",
                label=f"{kind} {pct[:3]}",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent callers",
        ylabel="latency (ms)",
        title="Predict latency, 1 row per request",
    )
    ax.legend(fontsize=7)
    paths.append(_savefig(fig, f"serving-latency{suffix}.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, sweep in r["sweep"].items():
        ax.plot([s["callers"] for s in sweep], [s["rps"] for s in sweep], marker="o", label=kind)
    ax.set(
        xscale="log",
        xlabel="concurrent callers",
        ylabel="requests/s",
        title="Predict throughput, 1 row",
    )
    ax.legend()
    paths.append(_savefig(fig, f"serving-throughput{suffix}.png"))
    return paths


def plot_training(r: dict[str, Any], quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steady = r["samples"] * (r["epochs"] - 1)
    values = [
        steady / (r[k]["epoch_ends"][-1] - r[k]["epoch_ends"][0]) for k in ("plain", "fitserve")
    ]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(["plain script", "fitserve job"], values)
    ax.set(ylabel="samples/s during fit (epochs 2..n)", title="Training throughput, reference MLP")
    return _savefig(fig, f"training{'-quick' if quick else ''}.png")


def _savefig(fig: Any, name: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
