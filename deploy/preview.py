"""Render every Grafana dashboard of deploy/grafana as a PNG, from a live Prometheus.

    python deploy/preview.py --prometheus http://127.0.0.1:9090 [--minutes 30] [--out DIR]
    make dashboards-preview PROMETHEUS_URL=http://127.0.0.1:9090

Runs each panel's queries over the last ``--minutes`` (Prometheus's query_range API),
with the dashboard's template variables at ``.*`` unless given (``--var model=mnist``) and
``$__rate_interval`` at ``--rate-interval``, and draws one PNG per dashboard
(``serving.png``, ``training.png``) into ``--out`` (default deploy/preview/, git-ignored),
one subplot per panel, with its unit and legends. Not Grafana: a quick look at what the
panels show against a real stack (tests/integration/test_prometheus_scrape.py runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parent
UNIT_LABELS = {
    "s": "seconds",
    "reqps": "requests/s",
    "percentunit": "ratio (1 = 100%)",
    "bytes": "bytes",
    "short": "",
    "none": "",
}


def expand(expr: str, variables: dict[str, str], rate_interval: str) -> str:
    """A dashboard expression with Grafana's variables replaced: ``$__rate_interval``
    and the template variables (``.*`` when not given)."""
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), ".*"), expr)


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def api(base: str, path: str, **params: str) -> Any:
    """One Prometheus API call (its parameters as a POST form: queries can be long; GET
    when there are none); its ``data``."""
    body = urllib.parse.urlencode(params).encode() if params else None
    request = urllib.request.Request(f"{base.rstrip('/')}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 400/422: Prometheus says why in the body
        raise RuntimeError(f"{path} {params}: HTTP {exc.code}: {exc.read().decode()}") from None
    if answer.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {answer}")
    return answer["data"]


MAX_LEGEND = 8


def _last(values: Any) -> float:
    """The last number of a series (NaN counts as -inf), to rank legend entries."""
    finite = [float(v) for v in values if v == v]
    return finite[-1] if finite else float("-inf")


def panels(board: Any) -> list[Any]:
    return [p for p in board["panels"] if p.get("type") != "row"]


def render(
    base: str,
    board: Any,
    out: Path,
    *,
    minutes: float,
    variables: dict[str, str],
    rate_interval: str,
) -> Path:
    """Draw one dashboard; returns the PNG written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels(board)
    columns = 3
    rows = (len(shown) + columns - 1) // columns
    figure, axes = plt.subplots(
        rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False, layout="constrained"
    )
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 300)
    for ax, panel in zip(axes.flat, shown, strict=False):
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        for target in panel["targets"]:
            expr = expand(target["expr"], variables, rate_interval)
            data = api(
                base,
                "/api/v1/query_range",
                query=expr,
                start=str(start),
                end=str(end),
                step=str(step),
            )
            for series in data["result"]:
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]))
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(UNIT_LABELS.get(unit, unit), fontsize=8)
        ax.set_xlabel("seconds before now", fontsize=7)
        ax.tick_params(labelsize=7)
        if ax.lines:  # the legend of the 8 series highest at the end, so it fits
            lines = sorted(ax.lines, key=lambda line: -_last(line.get_ydata()))[:MAX_LEGEND]
            ax.legend(handles=lines, fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    figure.suptitle(f"{board['title']} (last {minutes:g} min, {base})")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{board['uid'].removeprefix('fitserve-')}.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def preview(
    base: str,
    out: Path,
    *,
    minutes: float = 30,
    variables: dict[str, str] | None = None,
    rate_interval: str = "1m",
) -> list[Path]:
    """Render every dashboard of deploy/grafana; returns the PNGs."""
    written = []
    for source in sorted((DEPLOY / "grafana").glob("*.json")):
        board = json.loads(source.read_text())
        written.append(
            render(
                base,
                board,
                out,
                minutes=minutes,
                variables=variables or {},
                rate_interval=rate_interval,
            )
        )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, default=DEPLOY / "preview")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate-interval", default="1m")
    parser.add_argument("--var", action="append", default=[], help="name=value (default .*)")
    args = parser.parse_args(argv)
    variables = dict(v.split("=", 1) for v in args.var)
    for path in preview(
        args.prometheus,
        args.out,
        minutes=args.minutes,
        variables=variables,
        rate_interval=args.rate_interval,
    ):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
