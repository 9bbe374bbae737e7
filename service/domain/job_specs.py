"""Validated job requests: what the api stores with a job and the worker runs.

These are pydantic models so that the api validates a request once, stores it as JSON in
the job record, and the worker reads back exactly what was validated.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from service.domain import allowed_keras, config_check, keras_signatures
from service.domain.resource_names import check_name
from service.errors import InvalidRequest
from service.plugins.registry import Form, Kind, installed


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Caps on the free-form fields of a job request. Everything a request holds is stored in
# the job's record (GetJob, ListJobs) and much of it in the fitserve.json of the version it
# publishes (GetModel), so no field may make those records huge; the request as a whole is
# capped too, by the api (Settings.max_job_request_bytes). Refusals name the field and the
# limit ("run.labels.team: String should have at most 256 characters").
MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 256
MAX_NAME_CHARS = 256  # Keras identifiers, output, array, feature and layer names, monitors
MAX_NAMES = 1000  # entries of a list or map of such names
MAX_URI_CHARS = 4096
MAX_ALIAS_CHARS = 64  # an alias is 1-63 characters; the model store checks its form

Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_KEY_CHARS)]
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE_CHARS)]


class NamedConfig(_Spec):
    """A Keras object by name plus constructor parameters."""

    name: str = Field(max_length=MAX_NAME_CHARS)
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(_Spec):
    """Exactly one of a Keras model config (JSON) or a declarative layer list."""

    keras_json: str = ""
    layers: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("layers")
    @classmethod
    def _json_numbers(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The wire (a protobuf Struct) carries every number as a double: a whole one is
        an int again ("units": 32, not 32.0), as the request's JSON most likely had it.
        The worker still passes a float where a Keras parameter defaults to one."""
        return [whole_numbers(layer) for layer in v]

    @model_validator(mode="after")
    def _one_of(self) -> ModelSpec:
        if bool(self.keras_json) == bool(self.layers):
            raise ValueError("give exactly one of keras_json (a Keras model config) or layers")
        return self


def whole_numbers(value: Any) -> Any:
    """A copy of JSON-like data with every whole float an int (the wire's Struct carries
    numbers as doubles); floats beyond 2**53, where doubles skip integers, stay floats."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


class CompileSpec(_Spec):
    """Arguments of ``model.compile``. A loss or metric is a Keras identifier or a plugin's
    registered name (``package>name``); without a loss the model must add its own
    (a plugin layer that calls ``add_loss``)."""

    optimizer: NamedConfig = NamedConfig(name="adam")
    loss: NamedConfig | None = None
    output_losses: dict[Name, NamedConfig] = Field(default_factory=dict, max_length=MAX_NAMES)
    loss_weights: dict[Name, float] = Field(default_factory=dict, max_length=MAX_NAMES)
    metrics: list[NamedConfig] = Field(default_factory=list, max_length=MAX_NAMES)
    weighted_metrics: list[NamedConfig] = Field(default_factory=list, max_length=MAX_NAMES)
    output_metrics: dict[Name, list[NamedConfig]] = Field(
        default_factory=dict, max_length=MAX_NAMES
    )

    @field_validator("output_metrics")
    @classmethod
    def _known_output_metrics(cls, v: dict[str, list[NamedConfig]]) -> dict[str, list[NamedConfig]]:
        return {
            out: [
                _known(m, allowed_keras.METRICS, Kind.METRIC, f"output_metrics.{out}[{i}]")
                for i, m in enumerate(ms)
            ]
            for out, ms in v.items()
        }

    @model_validator(mode="after")
    def _one_metrics_form(self) -> CompileSpec:
        if self.metrics and self.output_metrics:
            raise ValueError(
                "give metrics (for every output) or output_metrics (per output), not both"
            )
        return self

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: NamedConfig) -> NamedConfig:
        return _known(v, allowed_keras.OPTIMIZERS, None, "optimizer")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: NamedConfig | None) -> NamedConfig | None:
        return None if v is None else _known(v, allowed_keras.LOSSES, Kind.LOSS, "loss")

    @field_validator("output_losses")
    @classmethod
    def _known_output_losses(cls, v: dict[str, NamedConfig]) -> dict[str, NamedConfig]:
        return {
            k: _known(c, allowed_keras.LOSSES, Kind.LOSS, f"output_losses.{k}")
            for k, c in v.items()
        }

    @field_validator("metrics", "weighted_metrics")
    @classmethod
    def _known_metrics(cls, v: list[NamedConfig]) -> list[NamedConfig]:
        return [
            _known(m, allowed_keras.METRICS, Kind.METRIC, f"metrics[{i}]") for i, m in enumerate(v)
        ]

    @property
    def has_loss(self) -> bool:
        return self.loss is not None or bool(self.output_losses)


# Plugins a compile argument may name: a loss layer belongs in the model, not in compile.
_COMPILE_FORMS = (Form.FUNCTION, Form.CLASS)


def _known(v: NamedConfig, builtin: frozenset[str], kind: Kind | None, what: str) -> NamedConfig:
    """A built-in Keras identifier, or a plugin of ``kind`` whose parameters fit its
    signature; either way the parameters are walked by the allowlist check."""
    try:
        config_check.check_params(v.params, "params")
        name = v.name.lower() if kind is None else v.name
        if name in builtin:
            keras_signatures.check(kind.value if kind else "optimizer", name, v.params)
            return v.model_copy(update={"name": name})
        registry = installed()
        if kind is not None and registry.get(v.name) is not None:
            registry.find(kind, v.name, "", _COMPILE_FORMS).check_params(v.params, "")
            return v
    except InvalidRequest as exc:  # pydantic prefixes the field it was validating
        raise ValueError(exc.message) from None
    plugins = registry.names(kind, _COMPILE_FORMS) if kind is not None else []
    also = f"; plugins: {', '.join(plugins)}" if plugins else ""
    label = kind.value if kind is not None else what
    raise ValueError(f"unknown {label} {v.name!r}; valid: {', '.join(sorted(builtin))}{also}")


BUILTIN_DATASETS = (
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "imdb",
    "reuters",
    "boston_housing",
)
FEATURE_DTYPES = ("float32", "int64", "string")


def parse_feature(text: str) -> tuple[str, tuple[int, ...]]:
    """A TFRecord feature as ``"dtype:d1,d2"`` (``"int64:"`` for a scalar): the three
    dtypes ``tf.io.FixedLenFeature`` reads, and a fixed shape."""
    dtype, sep, dims = text.partition(":")
    if not sep or dtype not in FEATURE_DTYPES:
        raise ValueError(
            f"feature {text!r} must be 'dtype:shape' with dtype one of "
            f"{', '.join(FEATURE_DTYPES)}, e.g. 'float32:28,28' (or 'int64:' for a scalar)"
        )
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        raise ValueError(f"feature {text!r} has a shape that is not whole numbers") from None
    if any(d < 1 for d in shape):
        raise ValueError(f"feature {text!r} has a dimension below 1")
    return dtype, shape


class DatasetRef(_Spec):
    """Where a job reads data: an uploaded dataset (id or name), a URI, or a built-in."""

    dataset: str = Field("", max_length=MAX_NAME_CHARS)
    uri: str = Field("", max_length=MAX_URI_CHARS)
    builtin: str = Field("", max_length=MAX_NAME_CHARS)
    split: Literal["", "train", "test"] = ""
    input_keys: list[Name] = Field(default_factory=list, max_length=MAX_NAMES)
    target_keys: list[Name] = Field(default_factory=list, max_length=MAX_NAMES)
    feature_spec: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_NAMES)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetRef:
        if sum(map(bool, (self.dataset, self.uri, self.builtin))) != 1:
            raise ValueError("give exactly one of dataset, uri or builtin")
        if self.builtin and self.builtin not in BUILTIN_DATASETS:
            raise ValueError(
                f"unknown built-in dataset {self.builtin!r}; valid: {', '.join(BUILTIN_DATASETS)}"
            )
        if self.split and not self.builtin:
            raise ValueError("split is only for built-in datasets")
        if self.feature_spec and not self.uri:
            raise ValueError("feature_spec is only for TFRecord sources given by uri")
        for feature in self.feature_spec.values():
            parse_feature(feature)
        return self

    @property
    def streamed(self) -> bool:
        """Read lazily through tf.data (a uri), not loaded as arrays."""
        return bool(self.uri)

    @property
    def label(self) -> str:
        """How results name this data (evaluations, fitserve.json)."""
        if self.builtin:
            return f"builtin:{self.builtin}:{self.split or 'train'}"
        return self.dataset or self.uri


class FitSpec(_Spec):
    """Arguments of ``model.fit``."""

    epochs: int = Field(1, ge=1, le=100_000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    shuffle: bool = True
    validation_split: float = Field(0.0, ge=0.0, lt=1.0)
    validation_data: DatasetRef | None = None
    class_weight: dict[int, float] = Field(default_factory=dict)
    sample_weight_key: str = Field("", max_length=MAX_NAME_CHARS)
    initial_epoch: int = Field(0, ge=0)
    steps_per_epoch: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**31)

    @field_validator("class_weight")
    @classmethod
    def _weights_of_classes(cls, v: dict[int, float]) -> dict[int, float]:
        for class_id, weight in v.items():
            if class_id < 0:
                raise ValueError(f"class id {class_id} is negative; class ids count from 0")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(
                    f"class {class_id} has weight {weight}; a class weight is a finite number >= 0"
                )
        return v

    @property
    def validates(self) -> bool:
        """Whether the fit has validation data (so val_* metrics exist)."""
        return bool(self.validation_split) or self.validation_data is not None

    @model_validator(mode="after")
    def _validation_source(self) -> FitSpec:
        if self.validation_split and self.validation_data is not None:
            raise ValueError("give validation_split or validation_data, not both")
        if self.initial_epoch >= self.epochs:
            raise ValueError(
                f"initial_epoch {self.initial_epoch} must be below epochs {self.epochs}"
            )
        return self


class EarlyStoppingSpec(_Spec):
    enabled: bool = False
    monitor: str = Field("val_loss", max_length=MAX_NAME_CHARS)
    min_delta: float = 0.0
    patience: int = Field(0, ge=0)
    mode: Literal["auto", "min", "max"] = "auto"
    baseline: float | None = None
    restore_best_weights: bool = False
    start_from_epoch: int = Field(0, ge=0)


class ModelCheckpointSpec(_Spec):
    enabled: bool = False
    monitor: str = Field("val_loss", max_length=MAX_NAME_CHARS)
    save_best_only: bool = False
    mode: Literal["auto", "min", "max"] = "auto"
    save_weights_only: bool = False
    save_freq_batches: int | None = Field(None, ge=1)


class ReduceLROnPlateauSpec(_Spec):
    enabled: bool = False
    monitor: str = Field("val_loss", max_length=MAX_NAME_CHARS)
    factor: float = Field(0.1, gt=0.0, lt=1.0)
    patience: int = Field(10, ge=0)
    mode: Literal["auto", "min", "max"] = "auto"
    min_delta: float = 1e-4
    cooldown: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0.0)


class ThresholdSpec(_Spec):
    """A watched metric: when its epoch value first reaches ``value`` (at least it, for
    mode max; at most, for min), the job's event stream gets a "threshold" event, and with
    ``stop`` the fit stops there and the model is published, like a finished job."""

    monitor: str = Field(min_length=1, max_length=200)
    value: float = Field(allow_inf_nan=False)
    mode: Literal["auto", "min", "max"] = "auto"
    stop: bool = False

    @property
    def direction(self) -> Literal["min", "max"]:
        """Keras's rule for "auto" (as in EarlyStopping): accuracy-like metrics grow."""
        if self.mode != "auto":
            return self.mode
        name = self.monitor.removeprefix("val_")
        grows = "acc" in name or name.startswith(("auc", "precision", "recall", "f1", "r2"))
        return "max" if grows else "min"


MAX_THRESHOLDS = 32


class CallbackSpec(_Spec):
    """Keras callbacks of a job; BackupAndRestore is always on."""

    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    model_checkpoint: ModelCheckpointSpec = ModelCheckpointSpec()
    reduce_lr_on_plateau: ReduceLROnPlateauSpec = ReduceLROnPlateauSpec()
    tensorboard: bool = False
    csv_logger: bool = False
    batch_progress: bool = False
    batch_progress_interval_seconds: float = Field(1.0, gt=0.0)
    plugins: list[NamedConfig] = Field(default_factory=list, max_length=32)
    thresholds: list[ThresholdSpec] = Field(default_factory=list, max_length=MAX_THRESHOLDS)

    @field_validator("plugins")
    @classmethod
    def _known_plugins(cls, v: list[NamedConfig]) -> list[NamedConfig]:
        for i, cfg in enumerate(v):
            try:
                config_check.check_params(cfg.params, "params")
                plugin = installed().find(Kind.CALLBACK, cfg.name, f"plugins[{i}]")
                plugin.check_params(cfg.params, f"plugins[{i}]")
            except InvalidRequest as exc:
                raise ValueError(exc.message) from None
        return v


class RunSpec(_Spec):
    """Where and how a job runs."""

    queue: Literal["train", "cpu"] = "train"
    mixed_precision: Literal["", "mixed_float16", "mixed_bfloat16"] = ""
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    # Seconds the job may run on a worker; the api fills in the server's default before
    # queueing (and refuses more than its maximum), so the record says the limit it runs
    # under. None only in jobs queued before time limits existed.
    time_limit_seconds: int | None = Field(None, ge=1, le=2**31 - 1)


class TrainSpec(_Spec):
    """A validated Train request."""

    model_name: str
    model: ModelSpec
    compile: CompileSpec = CompileSpec()
    dataset: DatasetRef
    fit: FitSpec = FitSpec()
    callbacks: CallbackSpec = CallbackSpec()
    run: RunSpec = RunSpec()
    idempotency_key: str = Field("", max_length=128)

    @field_validator("model_name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_name(v, "model_name", "model name")


class EvaluateSpec(_Spec):
    """A validated Evaluate request; ``version`` is resolved by the api before queueing,
    so the job evaluates the version the caller meant even if an alias moves meanwhile."""

    model_name: str
    version: int = Field(0, ge=0)
    alias: str = Field("", max_length=MAX_ALIAS_CHARS)
    dataset: DatasetRef
    batch_size: int = Field(32, ge=1, le=1_000_000)
    run: RunSpec = RunSpec(queue="cpu")

    @field_validator("model_name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_name(v, "model.name", "model name")

    @field_validator("run", mode="before")
    @classmethod
    def _cpu_by_default(cls, v: Any) -> Any:
        """Evaluation is light: it goes to the cpu queue unless the caller picks one."""
        if isinstance(v, dict) and not v.get("queue"):
            return v | {"queue": "cpu"}
        return v


HEAD_ACTIVATIONS = frozenset(
    {"softmax", "sigmoid", "linear", "relu", "tanh", "softplus", "log_softmax", "gelu"}
)


class ModelRefSpec(_Spec):
    """A stored version by number or alias; the api pins ``version`` before queueing."""

    name: str
    version: int = Field(0, ge=0)
    alias: str = Field("", max_length=MAX_ALIAS_CHARS)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_name(v, "base.name", "model name")


class NewHeadSpec(_Spec):
    """A new classification head on the frozen base (transfer learning)."""

    num_classes: int = Field(ge=1, le=1_000_000)
    activation: str = Field("softmax", max_length=MAX_NAME_CHARS)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, v: str) -> str:
        if v not in HEAD_ACTIVATIONS:
            raise ValueError(
                f"unknown activation {v!r}; valid: {', '.join(sorted(HEAD_ACTIVATIONS))}"
            )
        return v


class LayerSelectionSpec(_Spec):
    """Layers by name or by index (negative from the end)."""

    names: list[Name] = Field(default_factory=list, max_length=10_000)
    indices: list[int] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _some(self) -> LayerSelectionSpec:
        if not self.names and not self.indices:
            raise ValueError("name at least one layer: names or indices")
        return self


class HeadLayersSpec(_Spec):
    """A new head of several layers (a layer list) on the base."""

    layers: list[dict[str, Any]] = Field(min_length=1, max_length=1000)
    drop_last: int = Field(0, ge=0)
    train_base: bool = False

    @field_validator("layers")
    @classmethod
    def _checked(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, layer in enumerate(v):
            if "input_shape" in layer:
                raise ValueError(f"layers[{i}] has input_shape; the base gives the head's input")
        try:
            config_check.check_model_spec(ModelSpec(layers=v))
        except InvalidRequest as exc:
            raise ValueError(exc.message.replace("model.layers", "layers")) from None
        return [whole_numbers(layer) for layer in v]


class FreezeSpec(_Spec):
    """Which layers a fine-tune trains: the last N, or a new head on a frozen base; then
    optionally a second phase with the top K layers unfrozen at a lower learning rate."""

    train_last_n_layers: int | None = Field(None, ge=1)
    new_head: NewHeadSpec | None = None
    freeze_layers: LayerSelectionSpec | None = None
    head_layers: HeadLayersSpec | None = None
    unfreeze_top_k: int = Field(0, ge=0)
    unfreeze_learning_rate: float = Field(0.0, ge=0.0)
    unfreeze_epochs: int = Field(0, ge=0, le=100_000)

    @model_validator(mode="after")
    def _one_strategy(self) -> FreezeSpec:
        chosen = [
            self.train_last_n_layers is not None,
            self.new_head is not None,
            self.freeze_layers is not None,
            self.head_layers is not None,
        ]
        if sum(chosen) != 1:
            raise ValueError(
                "set exactly one of train_last_n_layers (train only the last N layers), "
                "new_head (freeze the whole base and add a head with num_classes), "
                "freeze_layers (freeze these layers by name or index) or head_layers (a "
                "new head as a layer list on the base)"
            )
        if bool(self.unfreeze_top_k) != bool(self.unfreeze_epochs):
            raise ValueError(
                "the second phase needs both unfreeze_top_k and unfreeze_epochs (or neither)"
            )
        return self

    @property
    def second_phase(self) -> bool:
        return self.unfreeze_top_k > 0


class FineTuneSpec(_Spec):
    """A validated FineTune request; ``base.version`` is pinned by the api, and
    ``model_name`` defaults to the base's name."""

    base: ModelRefSpec
    model_name: str = ""
    freeze: FreezeSpec
    compile: CompileSpec
    dataset: DatasetRef
    fit: FitSpec = FitSpec()
    callbacks: CallbackSpec = CallbackSpec()
    run: RunSpec = RunSpec()
    idempotency_key: str = Field("", max_length=128)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        """The result is published under the base's name unless the caller names it."""
        if isinstance(data, dict) and not data.get("model_name"):
            base = data.get("base")
            if isinstance(base, dict) and base.get("name"):
                return data | {"model_name": base["name"]}
        return data

    @field_validator("model_name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_name(v, "model_name", "model name")

    @property
    def total_epochs(self) -> int:
        """Both phases: the second continues the epoch count of the first."""
        return self.fit.epochs + self.freeze.unfreeze_epochs


def parse_train(data: dict[str, Any]) -> TrainSpec:
    """Validate a Train request given as plain data; errors name the field at fault."""
    try:
        spec = TrainSpec.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    _check_streamed_fit(spec.dataset, spec.fit)
    _check_monitors(spec.fit, spec.callbacks)
    if not spec.compile.has_loss and not config_check.adds_loss(spec.model):
        raise InvalidRequest(MISSING_LOSS, field="compile.loss")
    _check_outputs(spec.compile, config_check.output_names(spec.model))
    check_class_ids(spec.fit, config_check.output_units(spec.model))
    return spec


def _check_monitors(fit: FitSpec, callbacks: CallbackSpec) -> None:
    """A callback watching val_* needs validation data, or it would watch nothing."""
    if fit.validates:
        return
    watched = [
        (f"callbacks.{name}.monitor", cb.monitor)
        for name, cb in (
            ("early_stopping", callbacks.early_stopping),
            ("model_checkpoint", callbacks.model_checkpoint),
            ("reduce_lr_on_plateau", callbacks.reduce_lr_on_plateau),
        )
        if cb.enabled
    ]
    watched += [
        (f"callbacks.thresholds.{i}.monitor", t.monitor) for i, t in enumerate(callbacks.thresholds)
    ]
    for field, monitor in watched:
        if monitor.startswith("val_"):
            raise InvalidRequest(
                f"{field}: {monitor!r} is a validation metric, but the fit has no validation "
                f"data; set fit.validation_split or fit.validation_data, or monitor "
                f"{monitor.removeprefix('val_')!r}",
                field=field,
            )


def _check_outputs(compile_spec: CompileSpec, outputs: list[str] | None) -> None:
    """Per-output losses and metrics name real outputs; a multi-output model takes its
    metrics per output."""
    if outputs is None:
        return
    listing = ", ".join(map(repr, outputs))
    for field, names in (
        ("compile.output_losses", compile_spec.output_losses),
        ("compile.output_metrics", compile_spec.output_metrics),
    ):
        unknown = [n for n in names if n not in outputs]
        if unknown:
            raise InvalidRequest(
                f"{field}: the model has no output {unknown[0]!r}; its outputs: {listing}",
                field=field,
            )
    if len(outputs) > 1 and compile_spec.metrics:
        example = ", ".join(f'"{n}": ["..."]' for n in outputs)
        raise InvalidRequest(
            f"compile.metrics: the model has {len(outputs)} outputs ({listing}); give "
            f"metrics per output in compile.output_metrics, e.g. {{{example}}}",
            field="compile.metrics",
        )


def check_class_ids(fit: FitSpec, units: int | None) -> None:
    """Class weights only for classes the model's output can give (checked at submission
    where the request tells the units, and by the worker on the built model)."""
    if units is None or not fit.class_weight:
        return
    classes = max(units, 2)  # one sigmoid unit: classes 0 and 1
    beyond = sorted(c for c in fit.class_weight if c >= classes)
    if beyond:
        raise InvalidRequest(
            f"fit.class_weight: class {beyond[0]} cannot occur: the model's output has "
            f"{units} unit{'s' if units != 1 else ''}, so class ids are 0 to {classes - 1}",
            field="fit.class_weight",
        )


MISSING_LOSS = (
    "compile.loss is required, e.g. 'sparse_categorical_crossentropy' (only a model with a "
    "plugin layer that calls add_loss may leave it out)"
)


def parse_fine_tune(data: dict[str, Any]) -> FineTuneSpec:
    """Validate a FineTune request given as plain data; errors name the field at fault."""
    try:
        spec = FineTuneSpec.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    _check_streamed_fit(spec.dataset, spec.fit)
    _check_monitors(spec.fit, spec.callbacks)
    return spec


def _check_streamed_fit(dataset: DatasetRef, fit: FitSpec) -> None:
    """Keras splits only arrays: a tf.data source needs a separate validation dataset."""
    if dataset.streamed and fit.validation_split:
        raise InvalidRequest(
            "fit.validation_split cannot split a uri (tf.data) dataset, Keras splits only "
            "arrays; give fit.validation_data instead",
            field="fit.validation_split",
        )


def parse_evaluate(data: dict[str, Any]) -> EvaluateSpec:
    """Validate an Evaluate request given as plain data; errors name the field at fault."""
    try:
        return EvaluateSpec.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequest:
    err = exc.errors(include_url=False)[0]
    loc = [_shown(str(p)) for p in err["loc"]]
    message = str(err["msg"]).removeprefix("Value error, ")
    if loc[-1:] == ["[key]"]:  # a map's key: name the map, then the key
        *loc, key, _ = loc
        message = f"key {key!r}: {message}"
    field = ".".join(loc)
    if err["type"] == "missing":
        message = "is required"
    elif err["type"] == "extra_forbidden":
        message = "is not a known field"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    text = f"{field}: {message}" if field else message  # "": the request as a whole
    return InvalidRequest(f"{text}{more}", field=field or None)


def _shown(part: str, most: int = 64) -> str:
    """A part of a field's path as an error message shows it: a map key, which the
    caller chose, cut short."""
    return part if len(part) <= most else f"{part[:most]}..."
