"""Spec files of `fitserve train SPEC` and `fitserve fine-tune MODEL --spec SPEC`: a YAML
or JSON mapping whose keys are the keyword arguments of `Client.train` (or
`Client.fine_tune`), read and checked here before anything is sent.

Pure logic (no calls): a local `.npz` dataset comes back as a `LocalDataset` for the
command to upload first; everything else is passed to the SDK as written.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from fitserve._client import Client
from fitserve._options import TrainingOptions
from fitserve.v1 import training_pb2

__all__ = [
    "FINE_TUNE_KEYS",
    "TRAIN_KEYS",
    "LocalDataset",
    "SpecError",
    "check_keys",
    "fine_tune_arguments",
    "load_spec",
    "parse_model_ref",
    "resolve_dataset",
    "train_arguments",
]

YAML_EXTRA = "pip install 'fitserve[cli]'"
_DATASET_KEYS = ("dataset", "validation_data")
# Keys of a spec that are not keyword arguments of the SDK call: the names local .npz
# files are uploaded under (default: the file's name without .npz).
_NAME_KEYS = {"dataset": "dataset_name", "validation_data": "validation_data_name"}
_NAME_PATTERN = re.compile(r"[^A-Za-z0-9._-]+")


class SpecError(ValueError):
    """A spec file that cannot be read, or whose content the call cannot take."""


@dataclass(frozen=True)
class LocalDataset:
    """A local .npz file to upload under `name` before the job is submitted."""

    path: Path
    name: str


def _keyword_arguments(call: Callable[..., Any], *, leave_out: tuple[str, ...]) -> list[str]:
    parameters = inspect.signature(call).parameters.values()
    named = [
        p.name
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        or p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    return [name for name in named if name not in ("self", "timeout", *leave_out)]


_OPTION_KEYS = list(TrainingOptions.__annotations__)
TRAIN_KEYS: tuple[str, ...] = tuple(
    sorted({*_keyword_arguments(Client.train, leave_out=()), *_OPTION_KEYS, *_NAME_KEYS.values()})
)
"""Every key a train spec may hold: `Client.train`'s keyword arguments (model_name,
layers or model, dataset, compile, fit, callbacks and run options) and dataset_name /
validation_data_name (what a local .npz is uploaded as)."""
FINE_TUNE_KEYS: tuple[str, ...] = tuple(
    sorted(
        {
            *_keyword_arguments(Client.fine_tune, leave_out=("base_model", "version", "alias")),
            *_OPTION_KEYS,
            *_NAME_KEYS.values(),
        }
    )
)
"""Every key a fine-tune spec may hold: `Client.fine_tune`'s keyword arguments but the
base model (given on the command line as MODEL[:VERSION|@ALIAS])."""


def load_spec(path: str | Path) -> dict[str, Any]:
    """The mapping in a .json, .yaml or .yml file; SpecError saying what is wrong."""
    spec_path = Path(path)
    try:
        text = spec_path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"cannot read spec {spec_path}: {error.strerror or error}") from None
    suffix = spec_path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        content = _load_yaml(text, spec_path)
    elif suffix == ".json":
        try:
            content = json.loads(text)
        except ValueError as error:
            raise SpecError(f"spec {spec_path} is not valid JSON: {error}") from None
    else:
        raise SpecError(f"spec {spec_path}: expected a .yaml, .yml or .json file")
    if not isinstance(content, dict):
        raise SpecError(
            f"spec {spec_path} must hold a mapping of the call's arguments (model_name: ..., "
            f"dataset: ..., ...), not {type(content).__name__}"
        )
    return {str(key): value for key, value in content.items()}


def _load_yaml(text: str, path: Path) -> Any:
    try:
        yaml = importlib.import_module("yaml")
    except ImportError:
        raise SpecError(
            f"reading the YAML spec {path} needs PyYAML, which the SDK does not install by "
            f"default: {YAML_EXTRA} (or write the spec as .json)"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"spec {path} is not valid YAML: {error}") from None


def check_keys(spec: Mapping[str, Any], accepted: tuple[str, ...], where: str) -> None:
    """SpecError naming the first unknown key and listing the accepted ones."""
    unknown = sorted(key for key in spec if key not in accepted)
    if unknown:
        keys = ", ".join(repr(key) for key in unknown)
        raise SpecError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {keys}; accepted keys: "
            + ", ".join(accepted)
        )


def resolve_dataset(
    value: Any, base_dir: Path, name: str | None = None, *, what: str = "dataset"
) -> LocalDataset | training_pb2.DatasetRef | str:
    """A spec's dataset: a local .npz (read from `base_dir` when relative) to upload as
    `name` (default: the file's stem), a DatasetRef written as a mapping (uri,
    feature_spec, ...), or a string the SDK takes as is (a dataset name or id,
    "builtin:mnist", a URI)."""
    if isinstance(value, Mapping):
        try:
            return json_format.ParseDict(dict(value), training_pb2.DatasetRef())
        except json_format.ParseError as error:
            raise SpecError(f"{what}: not a dataset reference: {error}") from None
    if not isinstance(value, str) or not value:
        raise SpecError(
            f"{what} must be a local .npz file, an uploaded dataset's name, a URI or a "
            f"mapping such as {{uri: ..., feature_spec: ...}}; got {value!r}"
        )
    if value.lower().endswith(".npz") and "://" not in value:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise SpecError(
                f"{what} file {path} does not exist (a relative path is read from {base_dir})"
            )
        return LocalDataset(path, name or _dataset_name(path))
    if name:
        raise SpecError(f"{_NAME_KEYS.get(what, what + '_name')} goes with a local .npz {what}")
    return value


def _dataset_name(path: Path) -> str:
    return _NAME_PATTERN.sub("-", path.stem).strip("-") or "dataset"


def train_arguments(spec: Mapping[str, Any], base_dir: Path, where: str) -> dict[str, Any]:
    """The keyword arguments of `Client.train` in a spec; local datasets as LocalDataset."""
    check_keys(spec, TRAIN_KEYS, where)
    model_name = spec.get("model_name")
    if not isinstance(model_name, str) or not model_name:
        raise SpecError(f"{where}: model_name (the name to publish the model under) is missing")
    if spec.get("dataset") is None:
        raise SpecError(
            f"{where}: dataset is missing (a local .npz, a dataset name or a URI; in the spec "
            "or as --dataset)"
        )
    arguments = _with_datasets(spec, base_dir)
    if "model" in arguments:
        arguments["model"] = _keras_model(arguments["model"], base_dir, where)
    return arguments


def fine_tune_arguments(spec: Mapping[str, Any], base_dir: Path, where: str) -> dict[str, Any]:
    """The keyword arguments of `Client.fine_tune` but the base model."""
    check_keys(spec, FINE_TUNE_KEYS, where)
    if spec.get("dataset") is None:
        raise SpecError(f"{where}: dataset is missing (a local .npz, a dataset name or a URI)")
    return _with_datasets(spec, base_dir)


def _with_datasets(spec: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """The call's arguments: a key left empty (YAML's `epochs:`, JSON's null) takes the
    SDK's default, and local datasets become LocalDataset."""
    arguments = {
        key: value
        for key, value in spec.items()
        if key not in _NAME_KEYS.values() and value is not None
    }
    for key in _DATASET_KEYS:
        name = spec.get(_NAME_KEYS[key])
        if name is not None and not isinstance(name, str):
            raise SpecError(f"{_NAME_KEYS[key]} must be a string, got {name!r}")
        if arguments.get(key) is not None:
            arguments[key] = resolve_dataset(arguments[key], base_dir, name, what=key)
        elif name is not None:
            raise SpecError(f"{_NAME_KEYS[key]} goes with a local .npz {key}")
    return arguments


def _keras_model(value: Any, base_dir: Path, where: str) -> str:
    """A Keras model config: a JSON string as is, a mapping (YAML) as JSON, or a path to a
    .json file (`model.to_json()` saved), read from `base_dir` when relative."""
    if isinstance(value, Mapping):
        return json.dumps(value)
    if (
        isinstance(value, str)
        and value.lower().endswith(".json")
        and not value.lstrip().startswith("{")
    ):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            return path.read_text(encoding="utf-8")
        except OSError as error:
            raise SpecError(f"{where}: cannot read model {path}: {error.strerror}") from None
    if isinstance(value, str):
        return value
    raise SpecError(
        f"{where}: model must be a Keras config (model.to_json(), as a string, a mapping or a "
        f".json file); got {type(value).__name__}"
    )


def parse_model_ref(text: str) -> tuple[str, int | None, str | None]:
    """MODEL, MODEL:VERSION or MODEL@ALIAS as (name, version, alias)."""
    if "@" in text:
        name, _, alias = text.rpartition("@")
        if not name or not alias:
            raise ValueError(
                f"bad model reference {text!r}; expected MODEL, MODEL:VERSION or MODEL@ALIAS"
            )
        return name, None, alias
    name, colon, version = text.rpartition(":")
    if colon:
        if not name or not version.isdigit() or int(version) < 1:
            raise ValueError(
                f"bad model reference {text!r}; expected MODEL, MODEL:VERSION (a number from 1) "
                "or MODEL@ALIAS"
            )
        return name, int(version), None
    if not text:
        raise ValueError("a model name is required")
    return text, None, None
