"""``fitserve worker --gpus``: which processes it plans, and its error without GPUs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.launch.workers import GpuChoiceError, chosen_gpus, plan_gpu_workers
from tests.conftest import ROOT

FOUR = ["0", "1", "2", "3"]


def _plan(gpus: str, discovered: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    return plan_gpu_workers(gpus, discovered, "train", 1, "INFO", {"KEEP": "yes"}, 42)


def test_all_plans_one_worker_per_gpu_each_seeing_only_its_gpu() -> None:
    plan = _plan("all", ["0", "1"])

    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in plan] == ["0", "1"]
    assert all(env["KEEP"] == "yes" for env, _ in plan)  # the rest of the environment kept
    nodes = [argv[argv.index("-n") + 1] for _, argv in plan]
    assert nodes == ["fitserve-gpu0-42@%h", "fitserve-gpu1-42@%h"]
    for _, argv in plan:
        assert argv[argv.index("-Q") + 1] == "train"
        assert argv[argv.index("-c") + 1] == "1"
        assert argv[argv.index("-A") + 1] == "worker.app"


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [("all", FOUR), ("2", ["0", "1"]), ("4", FOUR), ("1,3", ["1", "3"]), ("2,", ["2"])],
)
def test_gpus_selects_all_a_count_or_ids(gpus: str, expected: list[str]) -> None:
    assert chosen_gpus(gpus, FOUR) == expected


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        ("5", "this machine has 4 GPUs (0, 1, 2, 3); give a count from 1 to 4"),
        ("0", "give a count from 1 to 4"),
        ("1,7", "no GPU 7 here; give all, a count, or ids among 0, 1, 2, 3"),
    ],
)
def test_gpus_naming_gpus_that_do_not_exist_is_refused(gpus: str, message: str) -> None:
    with pytest.raises(GpuChoiceError, match=re.escape(message)):
        _plan(gpus, FOUR)


def test_without_gpus_any_choice_is_refused() -> None:
    with pytest.raises(GpuChoiceError, match="no GPUs found; run without --gpus"):
        _plan("all", [])


def test_worker_gpus_all_without_nvidia_smi_exits_with_the_reason(tmp_path: Path) -> None:
    # PATH without nvidia-smi, whatever this machine has
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(ROOT), "FITSERVE_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "service.main", "worker", "--gpus", "all"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert done.stderr.strip() == (
        "fitserve worker: no GPUs found; run without --gpus for a CPU worker"
    )
    assert done.stdout == ""
