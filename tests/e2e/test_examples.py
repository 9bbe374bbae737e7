"""Every lesson example (examples/lesson) runs against one real stack, as a user runs it
against `make run`: Redis, a server and a worker; the admin token read from the data folder.

With ``--small``: the generated stand-in for MNIST and 2 epochs, so the whole lesson takes
seconds of training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.domain.tokens import TokenStore
from service.launch.stack import Stack
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
LESSON = ROOT / "examples" / "lesson"

# What each script must print (beyond exiting 0), in the lesson's order.
EXPECTED = {
    "01_mnist_mlp.py": [
        "Epoch 2/2 - accuracy: ",
        " val_accuracy: ",
        "job SUCCEEDED: model lesson-mlp version 1",
        "Test loss: ",
        "stored versions: [1]",
        "version 1 predicts the same: True",
        "loaded with keras.models.load_model, it predicts",
    ],
    "02_functional.py": [
        'Model: "mnist_functional"',
        "job SUCCEEDED: model lesson-functional version 1",
        "predictions: [",
    ],
    "03_validation_split.py": [" val_loss: ", "job SUCCEEDED: validated on 51 held-out images"],
    "04_tf_data.py": ["saved 256 examples to ", "job SUCCEEDED: trained from "],
    "05_class_weight.py": ["job SUCCEEDED with class_weight={5: 2.0, 6: 1.0}"],
    "06_callbacks.py": [
        "job SUCCEEDED after ",
        "checkpoints/epoch-0001.keras",
        "tensorboard/train/events.out.tfevents.",
        "TensorBoard logs in lesson-tensorboard/",
    ],
    "07_custom_losses.py": [
        "examples>huber_fn",
        "huber_fn: SUCCEEDED",
        "huber(delta=2.0) with CategoricalTruePositives: SUCCEEDED",
        "LogisticEndpoint (add_loss, no loss=): SUCCEEDED",
        "endpoint_accuracy: ",
        "P(zero) of 3 images: ",
    ],
    "08_transfer_learning.py": [
        "frozen base: SUCCEEDED, lesson-frozen version 1",
        "new layer on top: SUCCEEDED, lesson-new-top version 1, fine-tuned from lesson-base v1",
    ],
}


@pytest.fixture(scope="module")
def lesson_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One stack for the whole lesson; the environment the scripts run in."""
    work = tmp_path_factory.mktemp("lesson")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSERVE_")}
    env |= {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "FITSERVE_LOG_FORMAT": "text"}

    (work / "data").mkdir()

    def admin_token(redis_url: str) -> None:  # as `fitserve up` makes one
        with redis.Redis.from_url(redis_url, decode_responses=True) as client:
            TokenStore(client).bootstrap_admin(work / "data" / "admin.token")

    with Stack(work, env=env, cwd=ROOT, after_redis=admin_token) as stack:
        yield env | {"FITSERVE_TARGET": stack.target, "FITSERVE_DATA_DIR": str(stack.data_dir)}


def test_every_script_of_the_lesson_is_tested() -> None:
    scripts = sorted(p.name for p in LESSON.glob("[0-9][0-9]_*.py"))
    assert scripts == list(EXPECTED)


@pytest.mark.parametrize("script", list(EXPECTED))
def test_lesson_example(script: str, lesson_env: dict[str, str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(LESSON / script), "--small"],
        env=lesson_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    missing = [line for line in EXPECTED[script] if line not in done.stdout]
    assert missing == [], output
    if script == "06_callbacks.py":  # the TensorBoard logs are downloaded, not listed only
        assert list((tmp_path / "lesson-tensorboard" / "tensorboard" / "train").iterdir())
