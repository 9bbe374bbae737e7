"""The devices a worker child trains on (worker side: imports TensorFlow).

``configure`` runs once as a child starts, before TensorFlow initializes its devices:
memory growth on every GPU (so a process does not grab a whole card up front), and
optionally the CPU split into logical devices, which lets MirroredStrategy run on a
machine without GPUs. ``strategy`` is the child's distribution strategy, shared by its
jobs; per job, ``precision`` holds the mixed-precision policy for the job's duration
only, and ``set_precision`` applies it to a model whose layers name their own policy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import keras
import tensorflow as tf

from service.errors import FailedPrecondition

log = logging.getLogger(__name__)
FLOAT32 = "float32"
# The policies a job's run.mixed_precision chooses between; set_precision leaves others
# (float64, bfloat16, quantized) alone, as a deliberate choice of the model's author.
JOB_POLICIES = frozenset({FLOAT32, "mixed_float16", "mixed_bfloat16"})


class MixedFloat16NeedsGpu(FailedPrecondition):
    """mixed_float16 was asked for on a worker that has no GPU."""

    reason = "MIXED_FLOAT16_NEEDS_GPU"


def configure(cpu_devices: int) -> None:
    """Memory growth on every GPU; the CPU split into ``cpu_devices`` logical devices."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        logical = [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)]
        tf.config.set_logical_device_configuration(cpu, logical)


@functools.cache
def strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over the GPUs when there are several, else over the logical CPU
    devices when the CPU was split, else TensorFlow's default (one device).

    One per child, made at its first job (its devices never change): each new
    MirroredStrategy numbers its all-reduce ops from the same start, so a later job whose
    gradients differ in size from an earlier one's would fail with a collective shape
    mismatch.
    """
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus if gpus else tf.config.list_logical_devices("CPU")
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def describe(chosen: tf.distribute.Strategy) -> str:
    """A log line naming the replicas a job trains on."""
    replicas = chosen.num_replicas_in_sync
    return f"training on {replicas} replica{'s' if replicas != 1 else ''} ({type(chosen).__name__})"


@contextlib.contextmanager
def precision(policy: str) -> Iterator[None]:
    """The global Keras dtype policy ``policy`` (empty: float32) for the block, reset to
    float32 afterwards whatever happens: a worker child runs many jobs."""
    if policy == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        raise MixedFloat16NeedsGpu(
            "run.mixed_precision 'mixed_float16' needs a GPU and this worker has none; "
            "use 'mixed_bfloat16' on CPU"
        )
    keras.mixed_precision.set_global_policy(policy or FLOAT32)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(FLOAT32)


def set_precision(model: keras.Model, policy: str) -> None:
    """Make a built model compute in ``policy`` (empty: float32), its outputs in float32.

    The global policy only reaches layers created without a dtype; a model loaded from
    model.keras, or built from a Keras config, gives each layer the policy it was saved
    with (float32 when it was trained without mixed precision). So each layer under a
    policy of ``JOB_POLICIES`` takes ``policy`` here, but the layers that give the model's
    outputs, which take float32 (the loss and the exported signature need it).
    """
    _set_precision(model, policy or FLOAT32, keep_outputs=True)


def _set_precision(model: keras.Model, policy: str, keep_outputs: bool) -> None:
    outputs = _output_layer_names(model) if keep_outputs else set()
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):  # a nested model: its own layers decide
            _set_precision(layer, policy, keep_outputs=layer.name in outputs)
        elif layer.dtype_policy.name in JOB_POLICIES:
            layer.dtype_policy = FLOAT32 if layer.name in outputs else policy


def _output_layer_names(model: keras.Model) -> set[str]:
    if isinstance(model, keras.Sequential):
        return {model.layers[-1].name} if model.layers else set()
    return set(getattr(model, "output_names", None) or ())


def float32_outputs(model: keras.Model) -> keras.Model:
    """``model`` itself when every output is float32; else the model under a float32
    linear Activation, so the loss and the exported signature see float32 (the Keras
    mixed-precision guide's advice). Only single-output models can be wrapped without
    renaming the output that per-output losses and metrics refer to."""
    if all(keras.backend.standardize_dtype(t.dtype) == FLOAT32 for t in model.outputs):
        return model
    if len(model.outputs) != 1:
        raise FailedPrecondition(
            "a mixed-precision model with several outputs must compute its outputs in "
            "float32: give each output layer dtype 'float32' in the model config"
        )
    out = keras.layers.Activation("linear", dtype=FLOAT32, name="float32_output")(model.outputs[0])
    return keras.Model(model.inputs, out, name=model.name)
