"""Every name on the allowlist must exist in the installed Keras, resolved as fitserve does."""

import keras
import pytest

from service.domain import allowed_keras
from service.domain.job_specs import CompileSpec, NamedConfig
from service.training.building import compile_model

CONFIG_MODULES = [
    keras.dtype_policies,
    keras.initializers,
    keras.regularizers,
    keras.constraints,
]
SERIALIZATION_MARKERS = {"__keras_tensor__", "__tuple__"}
# model.compile resolves these by looking at the model's outputs, not through metrics.get.
COMPILE_SPECIAL_METRICS = {"accuracy", "acc"}


@pytest.mark.parametrize("name", sorted(allowed_keras.LAYERS))
def test_every_allowed_layer_is_a_keras_layer_class(name):
    cls = getattr(keras.layers, name, None)

    assert isinstance(cls, type), f"keras.layers has no class {name}"
    assert issubclass(cls, keras.layers.Layer)


@pytest.mark.parametrize("name", ["Lambda", "TFSMLayer", "JaxLayer", "FlaxLayer"])
def test_layers_that_carry_code_or_paths_are_not_allowed(name):
    assert name not in allowed_keras.LAYERS


@pytest.mark.parametrize(
    ("name", "cls"),
    [("Sequential", keras.Sequential), ("Functional", keras.Model), ("Model", keras.Model)],
)
def test_model_classes_exist(name, cls):
    assert name in allowed_keras.MODELS
    assert issubclass(cls, keras.Model)


def test_models_are_exactly_the_three_model_classes():
    assert {"Sequential", "Functional", "Model"} == allowed_keras.MODELS


@pytest.mark.parametrize("name", sorted(allowed_keras.CONFIG_OBJECTS - SERIALIZATION_MARKERS))
def test_every_config_object_exists_in_a_keras_config_module(name):
    homes = [m.__name__ for m in CONFIG_MODULES if isinstance(getattr(m, name, None), type)]

    assert homes, f"{name} is in none of {[m.__name__ for m in CONFIG_MODULES]}"


@pytest.mark.parametrize("name", sorted(allowed_keras.OPTIMIZERS))
def test_every_optimizer_compiles(name):
    # compile_model always resolves optimizers by class name (keras.optimizers.get does not
    # know 'lamb'), so that is the lookup this checks.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    compile_model(
        model, CompileSpec(optimizer=NamedConfig(name=name), loss=NamedConfig(name="mse"))
    )

    assert isinstance(model.optimizer, keras.optimizers.Optimizer)
    assert type(model.optimizer).__name__.lower() == name


@pytest.mark.parametrize("name", sorted(allowed_keras.LOSSES))
def test_every_loss_resolves(name):
    assert callable(keras.losses.get(name))


@pytest.mark.parametrize("name", sorted(allowed_keras.METRICS - COMPILE_SPECIAL_METRICS))
def test_every_metric_resolves(name):
    assert keras.metrics.get(name) is not None


def test_module_prefixes_are_keras_modules():
    assert all(p.startswith("keras.") for p in allowed_keras.ALLOWED_MODULE_PREFIXES)
