"""``python -m bench run [--quick] [--only serving|training]``: run, report, save."""

from __future__ import annotations

import argparse
import sys
import time

from bench import report


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--quick", action="store_true", help="the reduced run, under 3 minutes")
    r.add_argument("--only", choices=["serving", "training"])
    a = p.parse_args()
    started = time.monotonic()
    suffix = "-quick" if a.quick else ""
    checks: list[report.Check] = []
    if a.only in (None, "serving"):
        from bench import serving

        results = serving.run(a.quick)
        found = report.serving_checks(results)
        report.save(f"serving{suffix}", results, found)
        report.plot_serving(results, a.quick)
        checks += found
    if a.only in (None, "training"):
        from bench import training

        results = training.run(a.quick)
        found = report.training_checks(results)
        report.save(f"training{suffix}", results, found)
        report.plot_training(results, a.quick)
        checks += found
    print(report.table(checks))
    print(
        f"\nmachine: {report.machine()}; took {time.monotonic() - started:.0f} s; "
        f"results in {report.RESULTS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
