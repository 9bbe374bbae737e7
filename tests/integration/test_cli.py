"""The `fitserve` command against the session's real server and worker: in-process through
`fitserve.cli.main`, and as a process of its own (on a pseudo-terminal for Ctrl-C) where
the behaviour depends on one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

import fitserve
from fitserve import cli
from service.config import AuthSettings
from service.domain.tokens import Role, TokenStore
from tests.conftest import ROOT, RunningServer, private_stack, refused_port
from tests.integration.conftest import MLP_LAYERS

pytestmark = pytest.mark.integration

LOSS = "sparse_categorical_crossentropy"
WAIT = 120.0  # generous: the machine is shared


@pytest.fixture(scope="module")
def target(server: RunningServer, worker: subprocess.Popen[bytes]) -> str:
    return server.target


@pytest.fixture(scope="module")
def data_folder(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]
) -> Path:
    """digits.npz (64 samples) and labels.npy (the first 8 labels) in a folder."""
    folder = tmp_path_factory.mktemp("cli-data")
    x, y = digits
    np.savez(folder / "digits.npz", x=x[:64], y=y[:64])
    np.save(folder / "x8.npy", x[:8])
    np.save(folder / "labels.npy", y[:8])
    return folder


def run(capsys: pytest.CaptureFixture[str], target: str, *argv: str) -> tuple[int, str, str]:
    """`fitserve --target TARGET ARGV...` in this process: (status, stdout, stderr)."""
    capsys.readouterr()
    status = cli.main(["--target", target, *argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_spec(folder: Path, name: str, **spec: object) -> Path:
    """A spec file: YAML when `name` ends with .yaml (written by hand, as a user would)."""
    path = folder / name
    if name.endswith(".json"):
        path.write_text(json.dumps(spec))
        return path
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def small_spec(model_name: str, **overrides: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "model_name": model_name,
        "dataset": "digits.npz",
        "layers": MLP_LAYERS,
        "optimizer": "adam",
        "loss": LOSS,
        "metrics": ["accuracy"],
        "epochs": 2,
        "batch_size": 16,
        "seed": 0,
    }
    spec.update(overrides)
    return spec


# -- train -----------------------------------------------------------------------------


def test_train_from_a_yaml_spec_uploads_the_npz_and_publishes_the_model(
    capsys: pytest.CaptureFixture[str], target: str, data_folder: Path, tmp_path: Path
) -> None:
    spec_folder = tmp_path / "specs"
    spec_folder.mkdir()
    shutil.copy(data_folder / "digits.npz", spec_folder / "digits.npz")
    spec = write_spec(spec_folder, "mlp.yaml", **small_spec("cli-yaml"))

    status, out, err = run(capsys, target, "train", str(spec))

    assert status == cli.EXIT_OK, err
    assert "Epoch 1/2" in out
    assert "Epoch 2/2" in out
    assert re.search(r"job \S+ SUCCEEDED: cli-yaml version 1", out)
    assert "accuracy=" in out
    assert "as dataset 'digits'" in err  # the relative path was read from the spec's folder
    with fitserve.Client(target) as client:
        assert [v.version for v in client.get_model("cli-yaml").versions] == [1]
        assert client.get_dataset("digits").num_examples == 64


def test_train_from_a_json_spec_prints_the_job_as_json(
    capsys: pytest.CaptureFixture[str], target: str, data_folder: Path, tmp_path: Path
) -> None:
    with fitserve.Client(target) as client:
        client.upload_dataset_file("cli-json-data", data_folder / "digits.npz")
    spec = write_spec(
        tmp_path, "mlp.json", **small_spec("ignored", dataset="cli-json-data", epochs=1)
    )

    status, out, err = run(capsys, target, "train", str(spec), "--model-name", "cli-json", "--json")

    assert status == cli.EXIT_OK, err
    job = json.loads(out)  # one document, nothing else on stdout
    assert job["state"] == "SUCCEEDED"
    assert job["kind"] == "TRAIN"
    assert job["model_name"] == "cli-json"
    assert job["model_version"] == 1
    assert set(job["metrics"]) >= {"loss", "accuracy"}
    assert [record["epoch"] for record in job["history"]] == [1]


def test_a_functional_model_from_a_json_file_with_a_dataset_mapping(
    capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path
) -> None:
    import keras

    x = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, activation="relu")(x)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(hidden)
    reg = keras.layers.Dense(1, name="reg")(hidden)
    (tmp_path / "two.json").write_text(keras.Model(x, [cls, reg]).to_json())
    rng = np.random.default_rng(3)
    features = rng.random((64, 4), dtype=np.float32)
    np.savez(
        tmp_path / "two.npz",
        x=features,
        cls=features[:, :3].argmax(axis=1),
        reg=features.sum(axis=1, keepdims=True),
    )
    with fitserve.Client(target) as client:
        client.upload_dataset_file("cli-two-outputs", tmp_path / "two.npz")
    spec = write_spec(
        tmp_path,
        "two.yaml",
        model_name="cli-two-outputs",
        model="two.json",  # model.to_json() saved beside the spec
        dataset={"dataset": "cli-two-outputs", "input_keys": ["x"], "target_keys": ["cls", "reg"]},
        loss={"cls": LOSS, "reg": "mse"},
        metrics={"cls": ["accuracy"], "reg": ["mae"]},
        epochs=2,
        seed=1,
    )

    status, out, err = run(capsys, target, "train", str(spec), "--json")

    assert status == cli.EXIT_OK, err
    job = json.loads(out)
    assert {"cls_accuracy", "reg_mae"} <= set(job["history"][-1]["logs"])


def test_the_example_spec_trains(
    capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path
) -> None:
    example = ROOT / "examples" / "cli"
    shutil.copy(example / "mnist-mlp.yaml", tmp_path / "mnist-mlp.yaml")
    subprocess.run(
        [
            sys.executable,
            str(example / "make_digits.py"),
            str(tmp_path / "digits.npz"),
            "--samples",
            "128",
        ],
        check=True,
        capture_output=True,
    )

    status, out, err = run(
        capsys,
        target,
        "train",
        str(tmp_path / "mnist-mlp.yaml"),
        "--epochs",
        "1",
        "--model-name",
        "cli-example",
        "--json",
    )

    assert status == cli.EXIT_OK, err
    assert json.loads(out)["model_version"] == 1


def test_detach_prints_the_job_id_and_returns_at_once(
    capsys: pytest.CaptureFixture[str], target: str, data_folder: Path
) -> None:
    spec = write_spec(data_folder, "detach.yaml", **small_spec("cli-detach", epochs=1))

    status, out, err = run(capsys, target, "train", str(spec), "--detach")
    json_status, json_out, _ = run(capsys, target, "train", str(spec), "--detach", "--json")

    assert status == json_status == cli.EXIT_OK
    job_id = out.strip()
    assert f"fitserve jobs watch {job_id}" in err
    detached = json.loads(json_out)
    assert detached["state"] in ("QUEUED", "RUNNING")
    with fitserve.Client(target) as client:
        assert client.get_job(job_id).wait(timeout=WAIT, verbose=0).model_version in (1, 2)
        assert client.get_job(detached["id"]).wait(timeout=WAIT, verbose=0).model_version
    status, out, _ = run(capsys, target, "jobs", "get", job_id)
    assert status == cli.EXIT_OK
    assert ["state", "SUCCEEDED"] in [line.split() for line in out.splitlines()]
    status, out, _ = run(capsys, target, "jobs", "watch", job_id, "--json")
    assert status == cli.EXIT_OK
    assert json.loads(out)["state"] == "SUCCEEDED"
    status, out, _ = run(capsys, target, "jobs", "list", "--model", "cli-detach", "--json")
    assert status == cli.EXIT_OK
    assert {job["state"] for job in json.loads(out)} == {"SUCCEEDED"}
    assert {job["id"] for job in json.loads(out)} == {job_id, detached["id"]}


# -- evaluate, fine-tune, aliases, versions --------------------------------------------


@pytest.fixture(scope="module")
def trained(target: str, data_folder: Path) -> str:
    """cli-registry, versions 1 and 2."""
    with fitserve.Client(target, timeout=WAIT) as client:
        dataset = client.upload_dataset_file("cli-registry-data", data_folder / "digits.npz")
        for seed in (1, 2):
            client.train(
                "cli-registry",
                layers=MLP_LAYERS,
                loss=LOSS,
                metrics=["accuracy"],
                dataset=dataset,
                epochs=1,
                seed=seed,
            ).wait(timeout=WAIT, verbose=0)
    return "cli-registry"


def test_evaluate_a_version_from_a_local_npz(
    capsys: pytest.CaptureFixture[str], target: str, trained: str, data_folder: Path
) -> None:
    npz = str(data_folder / "digits.npz")
    status, out, err = run(capsys, target, "evaluate", f"{trained}:1", "--dataset", npz, "--json")

    assert status == cli.EXIT_OK, err
    job = json.loads(out)
    assert (job["kind"], job["state"]) == ("EVALUATE", "SUCCEEDED")
    assert "loss" in job["metrics"]
    human_status, human, _ = run(capsys, target, "evaluate", trained, "--dataset", npz)
    assert human_status == cli.EXIT_OK
    assert "SUCCEEDED" in human
    assert "loss=" in human


def test_fine_tune_publishes_a_child_version(
    capsys: pytest.CaptureFixture[str], target: str, trained: str, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path, "tune.yaml", dataset="cli-registry-data", loss=LOSS, epochs=1, seed=0
    )
    status, out, err = run(
        capsys,
        target,
        "fine-tune",
        f"{trained}:2",
        "--spec",
        str(spec),
        "--train-last-n-layers",
        "1",
        "--model-name",
        "cli-tuned",
        "--json",
    )

    assert status == cli.EXIT_OK, err
    job = json.loads(out)
    assert (job["kind"], job["state"], job["model_version"]) == ("FINE_TUNE", "SUCCEEDED", 1)
    status, out, _ = run(capsys, target, "models", "get", "cli-tuned", "--json")
    (version,) = json.loads(out)["versions"]
    assert (version["parent_model"], version["parent_version"]) == (trained, 2)


def test_aliases_and_deleting_a_version(
    capsys: pytest.CaptureFixture[str], target: str, trained: str
) -> None:
    status, out, _ = run(capsys, target, "models", "alias", "set", trained, "stable", "1", "--json")
    assert status == cli.EXIT_OK
    assert json.loads(out)["version"] == 1
    status, out, _ = run(capsys, target, "models", "alias", "set", trained, "stable", "2")
    assert (status, out.strip()) == (cli.EXIT_OK, f"{trained}@stable -> version 2 (was version 1)")

    status, out, _ = run(capsys, target, "models", "get", trained)
    assert status == cli.EXIT_OK
    assert "aliases: stable=2" in out
    versions = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert "stable" in versions["2"]

    # an alias points at it: FAILED_PRECONDITION, exit 6, nothing deleted
    status, _, err = run(capsys, target, "models", "delete-version", trained, "2", "--yes")
    assert status == cli.EXIT_CONFLICT == 6
    assert err.startswith("error: ")
    assert err.count("\n") == 1

    status, out, _ = run(capsys, target, "models", "alias", "delete", trained, "stable", "--yes")
    assert (status, out.strip()) == (cli.EXIT_OK, f"alias {trained}@stable removed")
    status, out, _ = run(capsys, target, "models", "delete-version", trained, "2", "--json")
    assert status == cli.EXIT_OK  # no terminal: no question asked
    assert json.loads(out) == {"deleted": {"model_name": trained, "version": 2}}

    status, out, _ = run(capsys, target, "models", "versions", trained, "--json")
    assert [v["version"] for v in json.loads(out)] == [1]
    status, out, _ = run(capsys, target, "models", "list", "--json")
    (summary,) = [m for m in json.loads(out) if m["name"] == trained]
    assert (summary["version_count"], summary["aliases"]) == (1, {})


def test_datasets_delete(
    capsys: pytest.CaptureFixture[str], target: str, data_folder: Path
) -> None:
    npz = str(data_folder / "digits.npz")
    status, out, _ = run(capsys, target, "datasets", "upload", "cli-doomed", npz, "--json")
    assert (status, json.loads(out)["name"]) == (cli.EXIT_OK, "cli-doomed")
    status, out, _ = run(capsys, target, "datasets", "list")
    assert status == cli.EXIT_OK
    assert out.split()[:5] == ["NAME", "ID", "EXAMPLES", "BYTES", "CREATED"]
    assert "cli-doomed" in out

    status, out, _ = run(capsys, target, "datasets", "delete", "cli-doomed", "--yes")
    assert (status, out.strip()) == (cli.EXIT_OK, "dataset cli-doomed deleted")
    status, _, err = run(capsys, target, "datasets", "get", "cli-doomed")
    assert status == cli.EXIT_NOT_FOUND
    assert "cli-doomed" in err


def test_predict_then_feedback(
    capsys: pytest.CaptureFixture[str], target: str, trained: str, data_folder: Path
) -> None:
    x8 = str(data_folder / "x8.npy")
    status, out, _ = run(capsys, target, "predict", f"{trained}:1", x8, "--json")
    assert status == cli.EXIT_OK
    prediction = json.loads(out)
    assert prediction["version"] == 1
    (outputs,) = prediction["outputs"].values()
    assert np.asarray(outputs).shape == (8, 10)

    labels = str(data_folder / "labels.npy")
    status, out, err = run(capsys, target, "feedback", prediction["request_id"], labels, "--json")
    assert status == cli.EXIT_OK, err
    answer = json.loads(out)
    assert (answer["model_name"], answer["version"], answer["rows"]) == (trained, 1, 8)

    status, _, err = run(capsys, target, "predict", f"{trained}:1", x8)
    request_id = re.search(r"request id (\S+)", err)
    assert status == cli.EXIT_OK
    assert request_id
    inline = json.dumps(np.load(labels).tolist())
    status, out, _ = run(capsys, target, "feedback", request_id.group(1), inline)
    assert status == cli.EXIT_OK
    assert re.search(rf"feedback on {trained} version 1( output \S+)?: 8 rows, \d+ correct", out)


# -- exit statuses ---------------------------------------------------------------------


def test_a_spec_with_an_unknown_key_is_bad_input(
    capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, "typo.yaml", **small_spec("cli-typo", epoch=3))

    status, out, err = run(capsys, target, "train", str(spec))

    assert status == cli.EXIT_BAD_INPUT == 2
    assert out == ""
    assert err.startswith(f"error: {spec}: unknown key 'epoch'; accepted keys: ")
    assert "epochs" in err
    assert "callbacks" in err
    assert err.count("\n") == 1


def test_bad_yaml_and_a_missing_spec_are_bad_input(
    capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path
) -> None:
    (tmp_path / "broken.yaml").write_text("model_name: [unclosed\n")
    status, _, err = run(capsys, target, "train", str(tmp_path / "broken.yaml"))
    assert status == cli.EXIT_BAD_INPUT
    assert "is not valid YAML" in err
    status, _, err = run(capsys, target, "train", str(tmp_path / "missing.json"))
    assert status == cli.EXIT_BAD_INPUT
    assert "cannot read spec" in err


def test_the_servers_invalid_argument_is_bad_input(
    capsys: pytest.CaptureFixture[str], target: str, data_folder: Path
) -> None:
    spec = write_spec(data_folder, "adamm.json", **small_spec("cli-adamm", optimizer="adamm"))

    status, _, err = run(capsys, target, "train", str(spec))

    assert status == cli.EXIT_BAD_INPUT
    assert "unknown optimizer 'adamm'" in err


def test_an_unknown_model_is_not_found(capsys: pytest.CaptureFixture[str], target: str) -> None:
    for argv in (
        ("models", "get", "cli-ghost"),
        ("evaluate", "cli-ghost:1", "--dataset", "cli-registry-data"),
        ("jobs", "get", "0123456789abcdef0123456789abcdef"),
    ):
        status, _, err = run(capsys, target, *argv)
        assert status == cli.EXIT_NOT_FOUND == 3, argv
        assert err.startswith("error: ")


def test_a_failed_job_exits_1(
    capsys: pytest.CaptureFixture[str], target: str, data_folder: Path
) -> None:
    spec = write_spec(
        data_folder,
        "explodes.yaml",
        **small_spec("cli-explodes", loss="faults>exploding_loss"),
    )

    status, _out, err = run(capsys, target, "train", str(spec))

    assert status == cli.EXIT_JOB_FAILED == 1, err
    assert "faults>exploding_loss" in err  # the job's own error message
    upload, error = err.splitlines()  # what was uploaded, then the one error line
    assert upload.startswith("uploading ")
    assert error.startswith("error: ")

    status, out, err = run(capsys, target, "train", str(spec), "--json")
    assert status == cli.EXIT_JOB_FAILED
    job = json.loads(out)  # with --json, the failed job's record too
    assert job["state"] == "FAILED"
    assert "faults>exploding_loss" in job["error"]["message"]
    assert err.startswith("error: ")


def test_a_missing_or_too_weak_token_exits_4(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with private_stack(tmp_path, auth=AuthSettings(refresh_seconds=0.2)) as (settings, running):
        store = TokenStore(redis.Redis.from_url(settings.redis_url, decode_responses=True))
        viewer, _ = store.create("cli-viewer", Role.VIEWER)  # auth is on from the first token
        wait_for(
            lambda: cli.main(["--target", running.target, "models", "list"]) == cli.EXIT_AUTH,
            "the server to require tokens",
        )
        status, _, err = run(capsys, running.target, "models", "list")
        assert status == cli.EXIT_AUTH == 4
        assert err.startswith("error: ")
        as_viewer = ("--token", viewer)
        assert run(capsys, running.target, *as_viewer, "models", "list")[0] == cli.EXIT_OK
        status, _, err = run(capsys, running.target, *as_viewer, "datasets", "delete", "x", "-y")
        assert status == cli.EXIT_AUTH
        assert err.count("\n") == 1


# -- as a process ----------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "clients" / "python"), str(ROOT)])
    return dict(
        os.environ,
        PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""),
        FITSERVE_TOKEN="",
    )


def fitserve_process(*argv: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fitserve.cli", *argv],
        env=cli_env(),
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )


def test_process_exit_statuses(target: str, tmp_path: Path) -> None:
    with refused_port() as port:
        unreachable = fitserve_process(
            "--target",
            f"127.0.0.1:{port}",
            "--timeout",
            "5",
            "models",
            "list",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = unreachable.communicate(timeout=WAIT)
    assert unreachable.returncode == cli.EXIT_UNAVAILABLE == 5
    assert err.startswith("error: ")
    assert err.count("\n") == 1

    usage = fitserve_process("models", "frobnicate", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    usage.communicate(timeout=WAIT)
    assert usage.returncode == cli.EXIT_BAD_INPUT

    (tmp_path / "list.json").write_text("[1, 2]")
    bad_spec = fitserve_process(
        "--target",
        target,
        "train",
        str(tmp_path / "list.json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = bad_spec.communicate(timeout=WAIT)
    assert bad_spec.returncode == cli.EXIT_BAD_INPUT
    assert "must hold a mapping" in err

    helped = fitserve_process("--help", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = helped.communicate(timeout=WAIT)
    assert helped.returncode == 0
    assert "exit status:" in out
    assert re.search(r"^  5 +unavailable", out, re.MULTILINE)


def long_spec(folder: Path, model_name: str) -> Path:
    """A job that runs until cancelled: a tiny model, 100 000 epochs."""
    return write_spec(
        folder, f"{model_name}.yaml", **small_spec(model_name, epochs=100_000, batch_size=32)
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_until_ended(client: fitserve.Client, job_id: str) -> fitserve.JobState:
    job = client.get_job(job_id)
    wait_for(lambda: job.refresh() is not None and job.state.terminal, f"job {job_id} to end")
    return job.state


def test_ctrl_c_without_a_terminal_stops_watching_and_says_how_to_resume(
    target: str, data_folder: Path, tmp_path: Path
) -> None:
    spec = long_spec(data_folder, "cli-sigint")
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = fitserve_process(
            "--target",
            target,
            "train",
            str(spec),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    job_id = ""
    with fitserve.Client(target) as client:
        try:
            wait_for(lambda: "Epoch 2/" in out_path.read_text(), "epoch 2")
            job_id = re.search(r"train job (\S+)", out_path.read_text()).group(1)  # type: ignore[union-attr]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=WAIT) == cli.EXIT_INTERRUPTED
            said = err_path.read_text()
            assert f"fitserve jobs watch {job_id}" in said
            assert "cancel the job" not in said  # no terminal: nothing asked
            assert client.get_job(job_id).state == fitserve.JobState.RUNNING
        finally:
            proc.kill()
            proc.wait()
            if job_id:
                client.cancel_job(job_id)
                assert wait_until_ended(client, job_id) == fitserve.JobState.CANCELLED


# A child on a pseudo-terminal of its own: a new session (Popen) whose controlling
# terminal is the pty (TIOCSCTTY), so ^C written to the master is SIGINT to it.
_ON_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'fitserve.cli', *sys.argv[1:]])"
)


class Terminal:
    """`fitserve ARGV` on a pseudo-terminal; everything it writes is collected."""

    def __init__(self, *argv: str) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ON_TERMINAL, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env=dict(cli_env(), TERM="xterm", COLUMNS="120"),
        )
        os.close(slave)
        self._master = master
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            with self._lock:
                self._output += chunk

    @property
    def output(self) -> str:
        with self._lock:
            return self._output.decode(errors="replace")

    def expect(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (found := re.search(pattern, self.output)) is None:
            if time.monotonic() > deadline or (self.proc.poll() is not None and not found):
                if self.proc.poll() is not None:
                    self._reader.join(5)
                    if found := re.search(pattern, self.output):
                        return found
                raise AssertionError(f"no {pattern!r} in the terminal:\n{self.output[-3000:]}")
            time.sleep(0.05)
        return found

    def type(self, text: str) -> None:
        os.write(self._master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            os.close(self._master)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(*argv: str) -> Terminal:
        opened.append(Terminal(*argv))
        return opened[-1]

    yield open_terminal
    for each in opened:
        if each.proc.poll() is None:
            each.proc.kill()
            each.close()


def test_ctrl_c_on_a_terminal_asks_whether_to_cancel_or_stop_watching(
    target: str, data_folder: Path, terminal: Callable[..., Terminal]
) -> None:
    spec = long_spec(data_folder, "cli-pty")
    job_ids: list[str] = []
    with fitserve.Client(target, timeout=WAIT) as client:
        try:
            # "w": stop watching, the job goes on
            watching = terminal("--target", target, "train", str(spec))
            job_ids.append(watching.expect(r"train job (\S+) of model cli-pty").group(1))
            watching.expect(r"Epoch 2/100000")
            watching.expect(r"━")  # the SDK's progress bar, drawn on the terminal
            watching.type("\x03")
            watching.expect(r"cancel the job, or just stop watching\? \[c/w\]")
            watching.type("w\n")
            assert watching.close() == cli.EXIT_INTERRUPTED
            assert f"fitserve jobs watch {job_ids[0]}" in watching.output
            assert client.get_job(job_ids[0]).state == fitserve.JobState.RUNNING
            client.cancel_job(job_ids[0])
            assert wait_until_ended(client, job_ids[0]) == fitserve.JobState.CANCELLED

            # "c": the job is cancelled, and the command ends with it
            cancelling = terminal("--target", target, "train", str(spec))
            job_ids.append(cancelling.expect(r"train job (\S+) of model cli-pty").group(1))
            cancelling.expect(r"Epoch 2/100000")
            cancelling.type("\x03")
            cancelling.expect(r"\[c/w\]")
            cancelling.type("c\n")
            assert cancelling.close() == cli.EXIT_JOB_FAILED
            assert f"job {job_ids[1]} was cancelled" in cancelling.output
            assert client.get_job(job_ids[1]).state == fitserve.JobState.CANCELLED
        finally:
            for job_id in job_ids:
                if not client.get_job(job_id).state.terminal:
                    client.cancel_job(job_id)
                    wait_until_ended(client, job_id)


def test_destructive_commands_ask_on_a_terminal(
    target: str, data_folder: Path, terminal: Callable[..., Terminal]
) -> None:
    with fitserve.Client(target) as client:
        client.upload_dataset_file("cli-asked", data_folder / "digits.npz")
        declined = terminal("--target", target, "datasets", "delete", "cli-asked")
        declined.expect(r"delete dataset cli-asked\? \[y/N\]")
        declined.type("n\n")
        assert declined.close() == cli.EXIT_JOB_FAILED
        assert "nothing done" in declined.output
        assert client.get_dataset("cli-asked").name == "cli-asked"

        confirmed = terminal("--target", target, "datasets", "delete", "cli-asked")
        confirmed.expect(r"\[y/N\]")
        confirmed.type("y\n")
        assert confirmed.close() == cli.EXIT_OK
        assert "dataset cli-asked deleted" in confirmed.output
        with pytest.raises(fitserve.NotFoundError):
            client.get_dataset("cli-asked")

        unasked = terminal("--target", target, "datasets", "delete", "cli-asked", "--yes")
        assert unasked.close() == cli.EXIT_NOT_FOUND  # --yes: straight to the server
        assert "[y/N]" not in unasked.output
