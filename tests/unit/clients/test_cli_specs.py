"""The CLI's pure logic: spec files, model references, exit statuses, tables, JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import fitserve
from fitserve import _cli_specs, cli
from fitserve._cli_specs import LocalDataset, SpecError
from fitserve._options import TrainingOptions
from fitserve.v1 import model_pb2, training_pb2

ROOT = Path(__file__).resolve().parents[3]
LAYERS = [{"type": "Dense", "units": 2}]


def _spec(**extra: Any) -> dict[str, Any]:
    return {"model_name": "m", "layers": LAYERS, "loss": "mse", "dataset": "d", **extra}


# -- spec files ------------------------------------------------------------------------


def test_yaml_and_json_specs_read_alike(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("model_name: m\nlayers:\n  - {type: Dense, units: 2}\n")
    (tmp_path / "a.json").write_text(json.dumps({"model_name": "m", "layers": LAYERS}))

    assert _cli_specs.load_spec(tmp_path / "a.yaml") == _cli_specs.load_spec(tmp_path / "a.json")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.yaml", "a: [1,\n", "is not valid YAML"),
        ("a.json", "{", "is not valid JSON"),
        ("a.json", "[1]", "must hold a mapping"),
        ("a.toml", "a = 1", "expected a .yaml, .yml or .json file"),
    ],
)
def test_unreadable_specs_say_why(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(SpecError, match=message):
        _cli_specs.load_spec(tmp_path / name)


def test_a_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot read spec .*No such file"):
        _cli_specs.load_spec(tmp_path / "nope.yaml")


def test_a_yaml_spec_without_pyyaml_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.yml").write_text("model_name: m\n")

    def no_yaml(name: str) -> object:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_cli_specs.importlib, "import_module", no_yaml)
    with pytest.raises(SpecError, match=r"needs PyYAML.*pip install 'fitserve\[cli\]'"):
        _cli_specs.load_spec(tmp_path / "a.yml")
    (tmp_path / "a.json").write_text('{"model_name": "m"}')
    assert _cli_specs.load_spec(tmp_path / "a.json") == {"model_name": "m"}  # JSON needs none


def test_every_train_keyword_and_option_is_a_spec_key() -> None:
    assert set(TrainingOptions.__annotations__) <= set(_cli_specs.TRAIN_KEYS)
    expected = {"model_name", "layers", "model", "dataset", "initial_epoch", "steps_per_epoch"}
    assert expected <= set(_cli_specs.TRAIN_KEYS)
    assert "timeout" not in _cli_specs.TRAIN_KEYS
    assert {"train_last_n_layers", "new_head", "head_layers", "model_name"} <= set(
        _cli_specs.FINE_TUNE_KEYS
    )
    assert not {"base_model", "version", "alias"} & set(_cli_specs.FINE_TUNE_KEYS)


def test_an_unknown_key_lists_the_accepted_ones(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as error:
        _cli_specs.train_arguments(_spec(epoch=3, lr=1), tmp_path, "s.yaml")
    message = str(error.value)
    assert message.startswith("s.yaml: unknown keys 'epoch', 'lr'; accepted keys: ")
    assert ", ".join(_cli_specs.TRAIN_KEYS) in message


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"layers": LAYERS, "dataset": "d"}, "model_name .* is missing"),
        ({"model_name": "m", "layers": LAYERS}, "dataset is missing"),
        (_spec(dataset=None), "dataset is missing"),
        (_spec(dataset=3), "dataset must be a local .npz file"),
        (_spec(dataset_name="x"), "dataset_name goes with a local .npz dataset"),
        (_spec(dataset="nope.npz"), r"dataset file .*nope.npz does not exist"),
        (_spec(model=42, layers=None), "model must be a Keras config"),
    ],
)
def test_spec_mistakes_are_spec_errors(tmp_path: Path, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _cli_specs.train_arguments(spec, tmp_path, "s")


def test_a_local_npz_is_read_from_the_spec_folder_and_named_after_the_file(
    tmp_path: Path,
) -> None:
    np.savez(tmp_path / "My Digits.npz", x=np.zeros(2), y=np.zeros(2))
    np.savez(tmp_path / "val.npz", x=np.zeros(2), y=np.zeros(2))

    arguments = _cli_specs.train_arguments(
        _spec(dataset="My Digits.npz", validation_data="val.npz", validation_data_name="v"),
        tmp_path,
        "s",
    )

    assert arguments["dataset"] == LocalDataset(tmp_path / "My Digits.npz", "My-Digits")
    assert arguments["validation_data"] == LocalDataset(tmp_path / "val.npz", "v")
    assert "validation_data_name" not in arguments  # not a keyword of Client.train


def test_an_empty_key_takes_the_sdks_default(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "model_name: m\ndataset: d\nlayers: [{type: Dense, units: 1}]\nmetrics:\nseed:\n"
    )
    spec = _cli_specs.load_spec(tmp_path / "s.yaml")
    assert "metrics" not in _cli_specs.train_arguments(spec, tmp_path, "s.yaml")


def test_a_spec_dataset_name_names_the_upload(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros(2))
    arguments = _cli_specs.train_arguments(
        _spec(dataset="d.npz", dataset_name="digits"), tmp_path, "s"
    )
    assert arguments["dataset"] == LocalDataset(tmp_path / "d.npz", "digits")


@pytest.mark.parametrize(
    "value", ["mnist-train", "sha256:ab", "builtin:mnist:test", "s3://bucket/train", "/srv/data"]
)
def test_other_dataset_strings_go_to_the_sdk_as_written(tmp_path: Path, value: str) -> None:
    assert _cli_specs.train_arguments(_spec(dataset=value), tmp_path, "s")["dataset"] == value


def test_a_dataset_mapping_is_a_dataset_ref(tmp_path: Path) -> None:
    value = {"uri": "s3://b/records", "feature_spec": {"x": "float32:28,28", "y": "int64:"}}
    ref = _cli_specs.train_arguments(_spec(dataset=value), tmp_path, "s")["dataset"]
    assert isinstance(ref, training_pb2.DatasetRef)
    assert ref.uri == "s3://b/records"
    assert dict(ref.feature_spec) == value["feature_spec"]
    with pytest.raises(SpecError, match="not a dataset reference"):
        _cli_specs.train_arguments(_spec(dataset={"url": "x"}), tmp_path, "s")


def test_a_keras_model_as_a_mapping_a_string_or_a_file(tmp_path: Path) -> None:
    config = {"class_name": "Sequential", "config": {"layers": []}}
    (tmp_path / "model.json").write_text(json.dumps(config))
    for model in (config, json.dumps(config), "model.json"):
        arguments = _cli_specs.train_arguments(
            {"model_name": "m", "model": model, "dataset": "d"}, tmp_path, "s"
        )
        assert json.loads(arguments["model"]) == config


def test_spec_arguments_build_the_sdks_request(tmp_path: Path) -> None:
    """What a spec gives is what Client.train takes: the request builds."""
    arguments = _cli_specs.train_arguments(
        _spec(
            metrics=["accuracy"],
            epochs=3,
            class_weight={"0": 1.0, "1": 2.0},  # JSON keys are strings
            callbacks={"early_stopping": {"patience": 2}, "batch_progress": True},
        ),
        tmp_path,
        "s",
    )
    request = fitserve._client.train_request(
        arguments.pop("model_name"),
        arguments.pop("layers"),
        None,
        arguments.pop("dataset"),
        0,
        0,
        arguments,
    )
    assert request.fit.epochs == 3
    assert dict(request.fit.class_weight) == {0: 1.0, 1: 2.0}
    assert request.callbacks.early_stopping.patience == 2


def test_the_example_spec_is_a_valid_spec() -> None:
    path = ROOT / "examples" / "cli" / "mnist-mlp.yaml"
    spec = _cli_specs.load_spec(path)
    _cli_specs.check_keys(spec, _cli_specs.TRAIN_KEYS, str(path))
    assert spec["dataset"] == "digits.npz"


def test_the_command_line_wins_over_the_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "here.npz", x=np.zeros(2))
    args = cli._parser().parse_args(
        ["train", "s.yaml", "--model-name", "n", "--epochs", "4", "--dataset", "here.npz"]
    )
    spec = cli._with_command_line(_spec(dataset="there.npz", dataset_name="t"), args)
    arguments = _cli_specs.train_arguments(spec, tmp_path / "elsewhere", "s.yaml")

    assert (arguments["model_name"], arguments["epochs"]) == ("n", 4)
    # read from the working folder, not the spec's; named after the file, not the spec's name
    assert arguments["dataset"] == LocalDataset(tmp_path / "here.npz", "here")


@pytest.mark.parametrize(
    "argv",
    [["--json", "models", "list"], ["models", "list", "--json"], ["--json", "jobs", "get", "j"]],
)
def test_json_goes_before_or_after_the_command(argv: list[str]) -> None:
    assert cli._parser().parse_args(argv).json is True
    assert cli._parser().parse_args([a for a in argv if a != "--json"]).json is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mnist", ("mnist", None, None)),
        ("mnist:3", ("mnist", 3, None)),
        ("mnist@canary", ("mnist", None, "canary")),
        ("team:mnist:2", ("team:mnist", 2, None)),
    ],
)
def test_model_references(text: str, expected: tuple[str, int | None, str | None]) -> None:
    assert _cli_specs.parse_model_ref(text) == expected


@pytest.mark.parametrize("text", ["", "m:", "m:0", "m:x", "@a", "m@", ":3"])
def test_bad_model_references(text: str) -> None:
    with pytest.raises(ValueError, match=r"model"):
        _cli_specs.parse_model_ref(text)


# -- exit statuses ---------------------------------------------------------------------


def _job(state: int) -> training_pb2.Job:
    return training_pb2.Job(id="j", state=state)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (fitserve.JobFailedError(_job(training_pb2.JOB_STATE_FAILED)), 1),
        (fitserve.JobCancelledError(_job(training_pb2.JOB_STATE_CANCELLED)), 1),
        (fitserve.InvalidArgumentError("x"), 2),
        (SpecError("x"), 2),
        (FileNotFoundError(2, "No such file", "x.npz"), 2),
        (ValueError("x"), 2),
        (TypeError("x"), 2),
        (fitserve.NotFoundError("x"), 3),
        (fitserve.UnauthenticatedError("x"), 4),
        (fitserve.PermissionDeniedError("x"), 4),
        (fitserve.UnavailableError("x"), 5),
        (fitserve.DeadlineExceededError("x"), 5),
        (TimeoutError("x"), 5),  # an OSError, but a wait that ran out of time
        (fitserve.FailedPreconditionError("x"), 6),
        (fitserve.AlreadyExistsError("x"), 6),
        (fitserve.ResourceExhaustedError("x"), 6),
        (fitserve.InternalError("x"), 7),
        (fitserve.UnimplementedError("x"), 7),
        (fitserve.DataLossError("x"), 7),
        (fitserve.FitserveError("x", code=grpc.StatusCode.ABORTED), 7),
    ],
)
def test_exit_statuses(error: BaseException, code: int) -> None:
    assert cli.exit_code(error) == code


def test_exit_statuses_are_distinct_and_documented_in_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    codes = [getattr(cli, name) for name in cli.__all__ if name.startswith("EXIT_")]
    assert len(codes) == len(set(codes)) == 9
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for code in codes:
        assert f"\n  {code} " in help_text


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["models", "alias", "set", "m", "stable", "not-a-number"])
    assert exited.value.code == cli.EXIT_BAD_INPUT
    assert "invalid int value" in capsys.readouterr().err


# -- output ----------------------------------------------------------------------------


def test_tables_pad_every_column_but_the_last() -> None:
    lines = cli.format_table(("NAME", "N", "NOTE"), [("a", "10", "x"), ("bbbb", "2", "")])
    assert lines == ["NAME  N   NOTE", "a     10  x", "bbbb  2"]
    assert cli.format_table(("A", "B"), []) == ["A  B"]
    assert cli.format_table(None, []) == []


def test_documents_have_every_field_numbers_and_short_enum_names() -> None:
    job = training_pb2.Job(
        id="j",
        kind=training_pb2.JOB_KIND_FINE_TUNE,
        state=training_pb2.JOB_STATE_CANCELLING,
        model_version=3,
        history=[training_pb2.EpochRecord(epoch=1, logs={"loss": 0.5})],
    )
    document = cli._job_document(job)
    assert (document["kind"], document["state"]) == ("FINE_TUNE", "CANCELLING")
    assert document["state"] == fitserve.JobState.CANCELLING
    assert document["model_version"] == 3  # int64: a number, not the proto JSON string
    assert document["queue"] == ""  # defaults too
    assert document["history"] == [{"epoch": 1, "logs": {"loss": 0.5}}]
    json.dumps(document)

    model = model_pb2.Model(name="m", aliases={"stable": 2}, versions=[model_pb2.ModelVersion()])
    assert cli._document(model)["aliases"] == {"stable": 2}


def test_labels_from_npy_npz_or_json(tmp_path: Path) -> None:
    np.save(tmp_path / "l.npy", np.array([1, 2]))
    np.savez(tmp_path / "y.npz", x=np.zeros(2), y=np.array([3, 4]))
    np.savez(tmp_path / "one.npz", labels=np.array([5]))
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.zeros(1))

    assert cli._load_labels(str(tmp_path / "l.npy")).tolist() == [1, 2]
    assert cli._load_labels(str(tmp_path / "y.npz")).tolist() == [3, 4]
    assert cli._load_labels(str(tmp_path / "one.npz")).tolist() == [5]
    assert cli._load_labels("[[0, 1], [1, 0]]").tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="which are the labels"):
        cli._load_labels(str(tmp_path / "two.npz"))
    with pytest.raises(ValueError, match=r"neither a \.npy/\.npz file nor JSON"):
        cli._load_labels("labels.txt")


# -- questions on a terminal -----------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "answer"), [("c\n", "c"), ("W\n", "w"), ("x\nwatch\n", "w"), ("", "w")]
)
def test_ask_repeats_until_an_answer_and_eof_is_the_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], typed: str, answer: str
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    assert cli._ask("cancel? [c/w] ", ("c", "w"), "w") == answer
    asked = capsys.readouterr().err.count("cancel? [c/w] ")
    assert asked == max(1, typed.count("\n"))


def test_enter_is_no_to_a_confirmation_and_asks_again_for_c_or_w(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli._ask("delete? [y/N] ", ("y", "n"), "n", enter="n") == "n"
    monkeypatch.setattr("sys.stdin", io.StringIO("\nc\n"))
    assert cli._ask("[c/w] ", ("c", "w"), "w") == "c"
    assert capsys.readouterr().err.count("[c/w] ") == 2
