"""Hypothesis strategies for tests/integration/test_fuzz.py: hostile requests to Predict
(fitserve's and TF Serving's), Train and UploadDataset, and raw wire noise.

Most strategies draw a *plausible* request (one the server would accept, so that the
deeper layers see traffic: the batcher, the job store, the dataset store) and then apply
a few *mutations*, each replacing one part with something hostile: huge, negative or zero
dimensions, lying dtypes and lengths, NaN and infinities, nested Struct values, giant and
unicode strings, names with path separators. The number of mutations is drawn too, so
some requests stay valid and must answer OK.

Memory: a TF Serving TensorProto is expanded by ``tf.make_ndarray`` before any check (a
one-element ``float_val`` fills the whole shape), so a shape of a few billion elements
would allocate gigabytes in the test process, on a machine shared with others. Shapes
here are either small (at most ``SMALL_ELEMENTS``) or so large that the allocation fails
at once (at least ``HUGE_ELEMENTS``), also after the int64 wrap-around TensorFlow's own
element count does; the band between is left to a test of its own (test_fuzz.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import warnings
import zipfile
from collections.abc import Callable
from typing import Any, TypeVar

import ml_dtypes
import numpy as np
from google.protobuf import struct_pb2, wrappers_pb2
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import model_pb2 as tfs_model_pb2
from tensorflow_serving.apis import predict_pb2 as tfs_predict_pb2

from fitserve.v1 import dataset_pb2, inference_pb2, tensor_pb2, training_pb2

MODEL = "fuzz-mlp"  # the published model: input "x" float32 [-1, 4], output 3 probabilities
FEATURES = 4
DATASET = "fuzz-data"  # an uploaded dataset: x float32 [16, 4], y int64 [16]
SMALL_ELEMENTS = 2**14
HUGE_ELEMENTS = 2**42  # 16 TiB of float32: refused by the allocator at once
T = TypeVar("T")
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def npz(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Stored array in format 3.0": unicode names, wanted
        (np.savez_compressed if compressed else np.savez)(buf, **arrays)  # type: ignore[operator]
    return buf.getvalue()


def valid_arrays(rows: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {
        "x": rng.random((rows, FEATURES), dtype=np.float32),
        "y": rng.integers(0, 3, rows),
    }


# The uploaded dataset's id: np.savez writes the same bytes every time (fixed zip dates).
DATASET_ID = "sha256:" + hashlib.sha256(npz(valid_arrays(16))).hexdigest()


# ---- values ---------------------------------------------------------------------------

BOUNDARY_INTS = [0, 1, -1, 2, 7, 255, 256, 2**15, 2**16, 10**6, 10**6 + 1, 2**31 - 1, -(2**31)]
BOUNDARY_INTS += [2**32, 2**53 + 1, 2**62, 2**63 - 1, -(2**63)]


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers in [low, high], boundary values drawn often."""
    edges = [v for v in BOUNDARY_INTS if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


int32s = ints(*INT32)
int64s = ints(*INT64)
floats = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 0.5]),
    st.floats(allow_nan=True, allow_infinity=True),
)

HOSTILE_TEXT = [
    "",
    " ",
    ".",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "..\\..\\windows",
    "~root",
    "$HOME",
    "%2e%2e%2f",
    "nul\x00byte",
    "new\nline",
    "\x1b[31mred",
    "ünïcödé",
    "名前",
    "emoji-😀",
    "\u202eevil",
    "CON",
    "a" * 63,
    "a" * 64,
    "a" * 300,
    "sha256:" + "0" * 64,
    "sha256:xyz",
    "-leading-dash",
    "UPPER",
    "examples>huber",
    "os.system",
    "__import__('os')",
    "{}",
    "null",
]


def giant_text() -> st.SearchStrategy[str]:
    """Strings from 1 KB to about 5 MB (past the server's 4 MiB message limit)."""
    return st.builds(
        lambda c, n: c * n, st.sampled_from(["a", "é", "😀", "/", "\x00"]), ints(1000, 1_400_000)
    )


def texts(*plausible: str, giant: bool = True) -> st.SearchStrategy[str]:
    """Text a field might hold: one of ``plausible`` (often), hostile text, random text."""
    options: list[st.SearchStrategy[str]] = [
        st.sampled_from(HOSTILE_TEXT),
        st.text(max_size=40),
    ]
    if plausible:
        options.insert(0, st.sampled_from(plausible))
    if giant:
        options.append(giant_text())
    return st.one_of(*options)


json_leaves = st.one_of(
    st.none(), st.booleans(), floats, st.integers(-(2**60), 2**60).map(float), texts(giant=False)
)


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """JSON-like values (what a google.protobuf.Struct holds), nested a few levels."""
    return st.recursive(
        json_leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
        ),
        max_leaves=max_leaves,
    )


def nested(depth: int, leaf: Any = 1.0, as_list: bool = False) -> Any:
    """A value nested ``depth`` levels deep: [[[...]]] or {"a": {"a": ...}}."""
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


# Deep, but within protobuf's parse depth (100 messages: about 30 Struct levels inside a
# TrainRequest); deeper ones do not parse, and test_fuzz.py sends them as raw bytes.
deep_values = st.builds(nested, st.integers(1, 28), json_leaves, st.booleans())


def struct_of(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def usually(valid: st.SearchStrategy[T], hostile: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``valid`` three times in four, else ``hostile``."""
    return st.integers(0, 3).flatmap(lambda n: hostile if n == 0 else valid)


# ---- mutations ------------------------------------------------------------------------

Mutation = Callable[[Any], None]


@st.composite
def mutated(
    draw: st.DrawFn,
    base: st.SearchStrategy[Any],
    mutations: list[st.SearchStrategy[Mutation]],
    most: int = 4,
) -> Any:
    """A request from ``base`` with 0 to ``most`` of ``mutations`` applied (none: it stays
    valid)."""
    request = draw(base)
    for _ in range(draw(st.integers(0, most))):
        draw(st.one_of(*mutations))(request)
    return request


def setter(path: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Mutation]:
    """A mutation setting the scalar field at dotted ``path`` to a drawn value."""

    def make(value: Any) -> Mutation:
        def apply(message: Any) -> None:
            *parents, last = path.split(".")
            for part in parents:
                message = getattr(message, part)
            setattr(message, last, value)

        return apply

    return values.map(make)


def editor(
    fn: Callable[[Any, Any], None], values: st.SearchStrategy[Any]
) -> st.SearchStrategy[Mutation]:
    """A mutation calling ``fn(message, value)`` with a drawn value."""
    return values.map(lambda value: lambda message: fn(message, value))


# ---- fitserve Predict -----------------------------------------------------------------

NUMERIC_WIRE = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    tensor_pb2.DATA_TYPE_INT8: np.dtype("i1"),
    tensor_pb2.DATA_TYPE_INT16: np.dtype("<i2"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DATA_TYPE_UINT16: np.dtype("<u2"),
    tensor_pb2.DATA_TYPE_UINT32: np.dtype("<u4"),
    tensor_pb2.DATA_TYPE_UINT64: np.dtype("<u8"),
    tensor_pb2.DATA_TYPE_BOOL: np.dtype("?"),
}
# Every DataType, and values the enum does not have (proto3 enums are open).
wire_dtypes = st.one_of(
    st.sampled_from(sorted(tensor_pb2.DataType.values())), st.sampled_from([15, 99, -1, 2**31 - 1])
)
# Dimensions: small ones, and the hostile ones (negative, huge, past int64 products).
dims = st.one_of(ints(0, 8), st.sampled_from([-1, -(2**63), 2**31, 2**32, 2**62, 2**63 - 1]))


def _rows_array(rows: int, values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(rows, FEATURES)


@st.composite
def model_inputs(draw: st.DrawFn) -> np.ndarray:
    """A valid input of the fuzz model: 1 to 8 rows of 4 float32, infinities included (NaN
    is refused: the mutations put it in)."""
    rows = draw(st.integers(1, 8))
    values = st.floats(width=32, allow_nan=False)
    values = draw(st.lists(values, min_size=rows * FEATURES, max_size=rows * FEATURES))
    return _rows_array(rows, values)


def to_wire(array: np.ndarray) -> tensor_pb2.Tensor:
    wire = next(k for k, v in NUMERIC_WIRE.items() if v == array.dtype.newbyteorder("<"))
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return tensor_pb2.Tensor(dtype=wire, shape=list(array.shape), content=little.tobytes())


@st.composite
def other_arrays(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """A well-formed tensor of any wire dtype and a small shape (0-d and empty included)."""
    wire = draw(st.sampled_from(sorted(NUMERIC_WIRE)))
    dtype = NUMERIC_WIRE[wire]
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    if dtype == NUMERIC_WIRE[tensor_pb2.DATA_TYPE_BFLOAT16]:
        array = np.zeros(shape, dtype=dtype)
    else:
        array = draw(hnp.arrays(dtype, shape))
    return tensor_pb2.Tensor(dtype=wire, shape=list(shape), content=array.tobytes())


@st.composite
def raw_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """A tensor whose fields need not agree: any dtype, shape, content and string_val."""
    return tensor_pb2.Tensor(
        dtype=draw(wire_dtypes),
        shape=draw(st.lists(dims, max_size=draw(st.sampled_from([4, 40])))),
        content=draw(st.binary(max_size=512)),
        string_val=draw(st.lists(st.binary(max_size=16), max_size=4)),
    )


def _resize_content(tensor: tensor_pb2.Tensor, delta: int) -> None:
    tensor.content = tensor.content[:delta] if delta < 0 else tensor.content + b"\x00" * delta


def _reshape(tensor: tensor_pb2.Tensor, shape: list[int]) -> None:
    del tensor.shape[:]
    tensor.shape.extend(shape)


def _with_nan(tensor: tensor_pb2.Tensor, at: int) -> None:
    content = bytearray(tensor.content)
    if len(content) >= 4:
        at = at % (len(content) // 4) * 4
        content[at : at + 4] = np.float32(np.nan).tobytes()
        tensor.content = bytes(content)


tensor_mutations: list[st.SearchStrategy[Callable[[tensor_pb2.Tensor], None]]] = [
    setter("dtype", wire_dtypes),
    editor(_reshape, st.lists(dims, max_size=6)),
    editor(lambda t, v: t.shape.append(v), dims),
    editor(_resize_content, st.sampled_from([-1, -4, 1, 3, 4, 1024])),
    editor(lambda t, v: t.string_val.extend(v), st.lists(st.binary(max_size=8), max_size=3)),
    setter("content", st.binary(max_size=64)),
    editor(_with_nan, st.integers(0, 64)),
    editor(lambda t, v: t.CopyFrom(v), st.one_of(other_arrays(), raw_tensors())),
]
model_names = texts(MODEL, "never-trained", giant=False)
aliases = texts("stable", "canary", "latest", giant=False)
input_names = texts("x", "", giant=False)


@st.composite
def model_refs(draw: st.DrawFn) -> tensor_pb2.ModelRef:
    ref = tensor_pb2.ModelRef(name=draw(model_names))
    which = draw(st.sampled_from(["none", "version", "alias"]))
    if which == "version":
        ref.version = draw(st.one_of(st.just(1), int64s))
    elif which == "alias":
        ref.alias = draw(aliases)
    return ref


def _one_input(inputs: Any) -> Any:
    return next(iter(inputs.values()), None)


def _mutate_input(request: Any, change: Callable[[Any], None]) -> None:
    if (tensor := _one_input(request.inputs)) is not None:
        change(tensor)


def _rename_input(request: Any, name: str) -> None:
    if (tensor := _one_input(request.inputs)) is not None:
        kept = type(tensor)()
        kept.CopyFrom(tensor)
        request.inputs.clear()
        request.inputs[name].CopyFrom(kept)


def _add_input(request: Any, item: tuple[str, Any]) -> None:
    request.inputs[item[0]].CopyFrom(item[1])


@st.composite
def base_predict_requests(draw: st.DrawFn) -> inference_pb2.PredictRequest:
    """A valid fitserve Predict of the fuzz model."""
    x = to_wire(draw(model_inputs()))
    return inference_pb2.PredictRequest(model=tensor_pb2.ModelRef(name=MODEL), inputs={"x": x})


common_predict_mutations: list[st.SearchStrategy[Mutation]] = [
    editor(_rename_input, input_names),
    editor(
        lambda r, v: r.output_filter.extend(v), st.lists(texts("output_0", giant=False), max_size=3)
    ),
    editor(lambda r, v: r.output_filter.append(v), giant_text()),  # past the size gate
    editor(lambda r, _: r.inputs.clear(), st.none()),
]
predict_mutations: list[st.SearchStrategy[Mutation]] = [
    *common_predict_mutations,
    editor(lambda r, v: r.model.CopyFrom(v), model_refs()),
    editor(_mutate_input, st.one_of(*tensor_mutations)),
    editor(_mutate_input, st.one_of(*tensor_mutations)),
    editor(_add_input, st.tuples(input_names, st.one_of(other_arrays(), raw_tensors()))),
]


def predict_requests() -> st.SearchStrategy[inference_pb2.PredictRequest]:
    """fitserve Predict: valid ones, and valid ones with hostile parts."""
    return mutated(base_predict_requests(), predict_mutations)


# ---- TF Serving Predict ---------------------------------------------------------------

TF_DTYPES = sorted(types_pb2.DataType.values())
tf_dtypes = st.one_of(st.sampled_from(TF_DTYPES), st.sampled_from([30, 99, -1]))


def _elements(shape: list[int]) -> tuple[int, int]:
    """The element count of ``shape`` exactly and as TensorFlow's int64 product wraps it."""
    exact = math.prod(shape)
    wrapped = (exact + 2**63) % 2**64 - 2**63
    return exact, wrapped


def tf_safe(shape: list[int]) -> bool:
    """Whether expanding a TensorProto of ``shape`` stays small or fails at once."""
    if any(d < 0 for d in shape):
        return True
    return all(n <= SMALL_ELEMENTS or n >= HUGE_ELEMENTS or n < 0 for n in _elements(shape))


def tf_shape(shape: list[int], unknown_rank: bool = False) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape],
        unknown_rank=unknown_rank,
    )


@st.composite
def tf_valid_tensors(draw: st.DrawFn) -> tf_tensor_pb2.TensorProto:
    """A DT_FLOAT [rows, 4] TensorProto as TF Serving clients send one: tensor_content, or
    float_val (all the values, or one that fills the shape)."""
    array = draw(model_inputs())
    proto = tf_tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=tf_shape(list(array.shape))
    )
    form = draw(st.sampled_from(["content", "values", "fill"]))
    if form == "content":
        proto.tensor_content = array.astype("<f4").tobytes()
    elif form == "values":
        proto.float_val.extend(array.ravel().tolist())
    else:
        proto.float_val.append(float(array.ravel()[0]))
    return proto


@st.composite
def tf_hostile_tensors(draw: st.DrawFn) -> tf_tensor_pb2.TensorProto:
    """A TensorProto with any dtype, shape and value fields, its shape kept tf_safe."""
    shape = draw(st.lists(dims, max_size=draw(st.sampled_from([4, 40]))).filter(tf_safe))
    proto = tf_tensor_pb2.TensorProto(
        dtype=draw(tf_dtypes),
        tensor_shape=tf_shape(shape, draw(st.booleans())),
        version_number=draw(st.one_of(st.just(0), int32s)),
    )
    values = draw(
        st.sampled_from(
            [
                "tensor_content",
                "float_val",
                "double_val",
                "int_val",
                "int64_val",
                "half_val",
                "bool_val",
                "string_val",
                "scomplex_val",
                "uint32_val",
                "none",
            ]
        )
    )
    small = {"max_size": draw(st.sampled_from([1, 8, 64]))}
    if values == "tensor_content":
        proto.tensor_content = draw(st.binary(**small))
    elif values in ("float_val", "double_val", "scomplex_val"):
        getattr(proto, values).extend(draw(st.lists(floats, **small)))
    elif values in ("int_val", "half_val"):
        getattr(proto, values).extend(draw(st.lists(int32s, **small)))
    elif values == "int64_val":
        proto.int64_val.extend(draw(st.lists(int64s, **small)))
    elif values == "uint32_val":
        proto.uint32_val.extend(draw(st.lists(ints(0, 2**32 - 1), **small)))
    elif values == "bool_val":
        proto.bool_val.extend(draw(st.lists(st.booleans(), **small)))
    elif values == "string_val":
        proto.string_val.extend(draw(st.lists(st.binary(max_size=16), **small)))
    return proto


@st.composite
def tf_model_specs(draw: st.DrawFn) -> tfs_model_pb2.ModelSpec:
    spec = tfs_model_pb2.ModelSpec(
        name=draw(model_names),
        signature_name=draw(st.one_of(st.just(""), texts("serving_default", giant=False))),
    )
    which = draw(st.sampled_from(["none", "none", "version", "label"]))
    if which == "version":
        spec.version.CopyFrom(wrappers_pb2.Int64Value(value=draw(st.one_of(st.just(1), int64s))))
    elif which == "label":
        spec.version_label = draw(aliases)
    return spec


def _tf_reshape(proto: tf_tensor_pb2.TensorProto, shape: list[int]) -> None:
    proto.tensor_shape.CopyFrom(tf_shape(shape))


tf_tensor_mutations: list[st.SearchStrategy[Callable[[Any], None]]] = [
    setter("dtype", tf_dtypes),
    editor(_tf_reshape, st.lists(dims, max_size=6).filter(tf_safe)),
    setter("tensor_shape.unknown_rank", st.booleans()),
    setter("version_number", int32s),
    setter("tensor_content", st.binary(max_size=64)),
    editor(lambda t, v: t.float_val.extend(v), st.lists(floats, max_size=8)),
    editor(lambda t, v: t.string_val.extend(v), st.lists(st.binary(max_size=8), max_size=3)),
    editor(lambda t, v: t.CopyFrom(v), tf_hostile_tensors()),
]


@st.composite
def base_tf_predict_requests(draw: st.DrawFn) -> Any:
    """A valid TF Serving Predict of the fuzz model."""
    request = tfs_predict_pb2.PredictRequest(inputs={"x": draw(tf_valid_tensors())})
    request.model_spec.name = MODEL
    return request


tf_predict_mutations: list[st.SearchStrategy[Mutation]] = [
    *common_predict_mutations,
    editor(lambda r, v: r.model_spec.CopyFrom(v), tf_model_specs()),
    editor(_mutate_input, st.one_of(*tf_tensor_mutations)),
    editor(_mutate_input, st.one_of(*tf_tensor_mutations)),
    editor(_add_input, st.tuples(input_names, tf_hostile_tensors())),
]


def tf_predict_requests() -> st.SearchStrategy[Any]:
    """TF Serving Predict: valid ones, and valid ones with hostile parts."""
    return mutated(base_tf_predict_requests(), tf_predict_mutations)


# ---- Train ----------------------------------------------------------------------------

LAYER_TYPES = [
    "Dense",
    "Dropout",
    "Flatten",
    "BatchNormalization",
    "Reshape",
    "Conv1D",
    "Conv2D",
    "LSTM",
    "Embedding",
    "InputLayer",
    "Lambda",
    "TFSMLayer",
    "examples>SimpleDense",
    "keras.layers.Dense",
    "Sequential",
    "Dense\x00",
]
ACTIVATIONS = ["relu", "softmax", "linear", "sigmoid", "exponential", "eval", "os.system"]
LOSSES = ["mse", "sparse_categorical_crossentropy", "huber", "examples>huber", "mae"]
OPTIMIZERS = ["adam", "sgd", "rmsprop", "adamw"]
METRICS = ["accuracy", "mae", "auc", "sparse_categorical_accuracy"]


def plausible_layers() -> list[dict[str, Any]]:
    return [
        {"type": "Dense", "units": 8, "activation": "relu", "input_shape": [FEATURES]},
        {"type": "Dropout", "rate": 0.1},
        {"type": "Dense", "units": 3, "activation": "softmax"},
    ]


layer_values = st.one_of(floats, ints(-(2**60), 2**60).map(float), json_values(), deep_values)


@st.composite
def hostile_layers(draw: st.DrawFn) -> dict[str, Any]:
    """A layer entry: a type (or none), plausible arguments with hostile values, and extra
    keys holding anything a Struct can."""
    layer: dict[str, Any] = {}
    if draw(st.integers(0, 5)):
        layer["type"] = draw(
            st.one_of(st.sampled_from(LAYER_TYPES), texts(giant=False), json_values(5))
        )
    for key in draw(
        st.lists(
            st.sampled_from(
                [
                    "units",
                    "rate",
                    "input_shape",
                    "activation",
                    "name",
                    "target_shape",
                    "filters",
                    "kernel_size",
                    "input_dim",
                    "output_dim",
                ]
            ),
            max_size=4,
        )
    ):
        layer[key] = draw(
            st.one_of(
                layer_values,
                st.lists(st.one_of(ints(-(2**60), 2**60).map(float), floats), max_size=5),
                st.sampled_from(ACTIVATIONS),
                texts(giant=False),
            )
        )
    layer.update(draw(st.dictionaries(st.text(max_size=12), layer_values, max_size=3)))
    return layer


def _layers(request: training_pb2.TrainRequest) -> Any:
    return request.model.layers.layers


def _set_layer(request: training_pb2.TrainRequest, drawn: tuple[int, dict[str, Any]]) -> None:
    index, layer = drawn
    layers = _layers(request)
    if len(layers) == 0 or index >= len(layers):
        layers.add().update(layer)
    else:
        layers[index].Clear()
        layers[index].update(layer)


@st.composite
def keras_json(draw: st.DrawFn) -> str:
    """A Keras model config: as JSON of a hostile structure, or text."""
    layer = st.fixed_dictionaries(
        {
            "class_name": st.one_of(st.sampled_from(LAYER_TYPES), json_values(3)),
            "config": json_values(10),
        },
        optional={
            "module": texts("keras.layers", giant=False),
            "registered_name": texts(giant=False),
        },
    )
    config = st.fixed_dictionaries(
        {
            "class_name": st.one_of(
                st.sampled_from(["Sequential", "Functional", "Model"]), json_values(3)
            ),
            "config": st.one_of(
                st.fixed_dictionaries({"layers": st.lists(layer, max_size=4)}), json_values(10)
            ),
        }
    )
    form = draw(st.sampled_from(["config", "config", "value", "text", "deep"]))
    if form == "config":
        return json.dumps(draw(config))  # NaN and Infinity included, as Python writes them
    if form == "value":
        return json.dumps(draw(json_values()))
    if form == "deep":
        depth = draw(st.sampled_from([99, 100, 101, 5000]))
        return (
            '{"class_name": "Sequential", "config": {"layers": ' + "[" * depth + "]" * depth + "}}"
        )
    return draw(texts(giant=True))


named_configs = st.builds(
    lambda name, params: training_pb2.NamedConfig(name=name, params=struct_of(params)),
    texts(*LOSSES, *OPTIMIZERS, *METRICS, giant=False),
    st.dictionaries(
        texts("learning_rate", "delta", "from_logits", giant=False), layer_values, max_size=3
    ),
)
dataset_refs = st.builds(
    lambda which, value, split, inputs, targets, spec: training_pb2.DatasetRef(
        **{which: value}, split=split, input_keys=inputs, target_keys=targets, feature_spec=spec
    ),
    st.sampled_from(["dataset", "uri", "builtin"]),
    texts(
        DATASET,
        DATASET_ID,
        "sha256:" + "0" * 64,
        "mnist",
        "/data/x",
        "s3://bucket/key",
        "file:///etc",
        "http://127.0.0.1:9/x",
    ),
    texts("train", "test", giant=False),
    st.lists(texts("x", giant=False), max_size=3),
    st.lists(texts("y", giant=False), max_size=3),
    st.dictionaries(texts("x", giant=False), texts("float32:4", "int64:", giant=False), max_size=3),
)


def _early_stopping(request: training_pb2.TrainRequest, v: tuple[str, int, float, str]) -> None:
    es = request.callbacks.early_stopping
    es.enabled, es.monitor, es.patience, es.baseline, es.mode = True, *v


def _checkpoint(request: training_pb2.TrainRequest, v: tuple[str, int]) -> None:
    mc = request.callbacks.model_checkpoint
    mc.enabled, mc.monitor, mc.save_freq_batches = True, *v


def _reduce_lr(request: training_pb2.TrainRequest, v: tuple[float, int, float]) -> None:
    lr = request.callbacks.reduce_lr_on_plateau
    lr.enabled, lr.factor, lr.patience, lr.min_lr = True, *v


def _clear_part(request: training_pb2.TrainRequest, which: str) -> None:
    if which == "model":
        request.ClearField("model")
    else:
        getattr(request, which).Clear()


def valid_train_request(model_name: str = "fuzz-model") -> training_pb2.TrainRequest:
    """A request the server accepts (and queues as a job on no worker)."""
    request = training_pb2.TrainRequest(
        model_name=model_name,
        dataset=training_pb2.DatasetRef(dataset=DATASET),
        compile=training_pb2.CompileOptions(
            loss=training_pb2.NamedConfig(name="sparse_categorical_crossentropy")
        ),
        fit=training_pb2.FitOptions(epochs=1, batch_size=4),
    )
    for layer in plausible_layers():
        request.model.layers.layers.add().update(layer)
    return request


base_train_requests = st.sampled_from(["fuzz-model", "fuzz-model-2"]).map(valid_train_request)


train_mutations: list[st.SearchStrategy[Mutation]] = [
    setter("model_name", texts("fuzz-model", MODEL)),
    setter("idempotency_key", texts("key-1", "key-2")),
    editor(_set_layer, st.tuples(st.integers(0, 4), hostile_layers())),
    editor(lambda r, v: _layers(r).add().update(v), hostile_layers()),
    editor(
        lambda r, n: [_layers(r).add().update({"type": "Dense", "units": 1}) for _ in range(n)],
        st.sampled_from([1000, 1001]),
    ),
    setter("model.keras_json", keras_json()),
    editor(_clear_part, st.sampled_from(["model", "compile", "dataset", "fit"])),
    editor(lambda r, v: r.compile.optimizer.CopyFrom(v), named_configs),
    editor(lambda r, v: r.compile.loss.CopyFrom(v), named_configs),
    editor(lambda r, v: r.compile.metrics.extend(v), st.lists(named_configs, max_size=3)),
    editor(lambda r, v: r.compile.weighted_metrics.extend(v), st.lists(named_configs, max_size=2)),
    editor(
        lambda r, kv: r.compile.output_losses[kv[0]].CopyFrom(kv[1]),
        st.tuples(texts("output_0", giant=False), named_configs),
    ),
    editor(
        lambda r, kv: r.compile.loss_weights.__setitem__(kv[0], kv[1]),
        st.tuples(texts("output_0", giant=False), floats),
    ),
    editor(
        lambda r, kv: r.compile.output_metrics[kv[0]].metrics.extend(kv[1]),
        st.tuples(texts("output_0", giant=False), st.lists(named_configs, max_size=2)),
    ),
    editor(lambda r, v: r.dataset.CopyFrom(v), dataset_refs),
    editor(lambda r, v: r.fit.validation_data.CopyFrom(v), dataset_refs),
    setter("fit.epochs", int32s),
    setter("fit.batch_size", int32s),
    setter("fit.shuffle", st.booleans()),
    setter("fit.validation_split", floats),
    setter("fit.initial_epoch", int32s),
    setter("fit.steps_per_epoch", int32s),
    setter("fit.seed", int64s),
    setter("fit.sample_weight_key", texts("w")),
    editor(lambda r, kv: r.fit.class_weight.__setitem__(kv[0], kv[1]), st.tuples(int64s, floats)),
    editor(
        _early_stopping,
        st.tuples(texts("loss", giant=False), int32s, floats, texts("min", "max", giant=False)),
    ),
    editor(_checkpoint, st.tuples(texts("val_loss", giant=False), int32s)),
    editor(_reduce_lr, st.tuples(floats, int32s, floats)),
    setter("callbacks.tensorboard", st.booleans()),
    setter("callbacks.batch_progress", st.booleans()),
    setter("callbacks.batch_progress_interval_seconds", floats),
    editor(lambda r, v: r.callbacks.plugins.extend(v), st.lists(named_configs, max_size=2)),
    editor(
        lambda r, v: r.callbacks.thresholds.add(monitor=v[0], value=v[1], mode=v[2], stop=v[3]),
        st.tuples(
            texts("loss", giant=False), floats, texts("min", "auto", giant=False), st.booleans()
        ),
    ),
    setter("run.queue", texts("train", "cpu")),
    setter("run.mixed_precision", texts("mixed_float16", "mixed_bfloat16", giant=False)),
    setter("run.time_limit_seconds", int32s),
    editor(
        lambda r, kv: r.run.labels.__setitem__(kv[0], kv[1]),
        st.tuples(texts("team"), texts("fuzz")),
    ),
    editor(
        lambda r, n: r.run.labels.update({f"k{i}": "v" for i in range(n)}),
        st.sampled_from([64, 65, 1001]),
    ),
]


def train_requests() -> st.SearchStrategy[training_pb2.TrainRequest]:
    return mutated(base_train_requests, train_mutations)


# ---- UploadDataset --------------------------------------------------------------------


array_dtypes = st.one_of(
    hnp.scalar_dtypes(),
    hnp.byte_string_dtypes(max_len=4),
    hnp.unicode_string_dtypes(max_len=4),
    hnp.array_dtypes(max_size=2),
    st.sampled_from([np.dtype(ml_dtypes.bfloat16), np.dtype(">f4"), np.dtype(">i8")]),
)


@st.composite
def weird_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of any dtype numpy writes (strings, structured, datetimes, big-endian) and
    small shapes, 0-d and empty included; now and then a pickled object array."""
    if draw(st.integers(0, 9)) == 0:
        return np.array([{"a": 1}, None], dtype=object)
    dtype = draw(array_dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    if (
        dtype.kind in "fciub"
        and dtype.names is None
        and dtype.itemsize
        and dtype != np.dtype(ml_dtypes.bfloat16)
    ):
        return draw(hnp.arrays(dtype, shape))
    return np.zeros(shape, dtype=dtype)


array_names = texts("x", "y", "sample_weight", giant=False).filter(lambda n: "\x00" not in n)


def npy_member(header: dict[str, Any] | str, data: bytes, version: int = 1) -> bytes:
    """A hand-made .npy: magic, a header (any dict, or text), then ``data``."""
    text = header if isinstance(header, str) else repr(header)
    body = text.encode("latin1", "replace")
    pad = (-(len(body) + 11)) % 64
    body += b" " * pad + b"\n"
    size = struct.pack("<H", len(body)) if version == 1 else struct.pack("<I", len(body))
    return b"\x93NUMPY" + bytes([version, 0]) + size + body + data


def zipped(members: list[tuple[str, bytes]], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", method) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for name, data in members:
            archive.writestr(name, data)
    return buf.getvalue()


npy_headers = st.one_of(
    st.fixed_dictionaries(
        {
            "descr": st.sampled_from(
                [
                    "<f4",
                    "<i8",
                    "|b1",
                    "|O",
                    "<U10",
                    "|V8",
                    "<M8[s]",
                    "<c16",
                    "|S0",
                    "float32",
                    "nonsense",
                ]
            ),
            "fortran_order": st.one_of(st.booleans(), st.just("yes")),
            "shape": st.one_of(
                st.lists(st.sampled_from([0, 1, 8, -1, 10**12, 2**63 - 1, 2**64]), max_size=3).map(
                    tuple
                ),
                st.just("not a shape"),
            ),
        }
    ),
    st.just({"descr": "<f4"}),
    texts(giant=False),
    # a valid header cut short: unclosed brackets and strings (numpy tokenizes those)
    st.builds(
        lambda n: "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4)}"[:n],
        st.integers(0, 55),
    ),
    st.sampled_from(['"""', "'", "(" * 300, "[" * 5000]),
    st.builds(
        lambda n: "{'descr': '<f4', 'fortran_order': False, 'shape': (" + "(" * n + ")" * n + ",)}",
        st.integers(1, 300),
    ),
)


@st.composite
def dataset_bytes(draw: st.DrawFn) -> bytes:
    """The file: a valid .npz, one with weird arrays, a hand-made .npy in a zip, a zip of
    other things, a truncated or corrupted one, or noise."""
    hostile = st.sampled_from(["weird", "npy", "zip", "many", "noise"])
    form = draw(st.one_of(st.just("valid"), hostile))
    compressed = draw(st.booleans())
    if form == "valid":
        data = npz(valid_arrays(draw(st.integers(1, 16))), compressed)
    elif form == "weird":
        arrays = draw(st.dictionaries(array_names, weird_arrays(), max_size=4))
        data = npz(arrays, compressed)
    elif form == "npy":
        member = npy_member(
            draw(npy_headers), draw(st.binary(max_size=64)), draw(st.sampled_from([1, 2, 3]))
        )
        data = zipped(
            [(draw(st.sampled_from(["x.npy", "y.npy", "../x.npy", "x"])), member)], compressed
        )
    elif form == "zip":
        names = st.one_of(
            st.sampled_from(["x.npy", "dir/", "../../evil.npy", "/abs.npy", "x.npy"]),
            st.text(min_size=1, max_size=20).filter(lambda n: "\x00" not in n),
        )
        data = zipped(
            draw(st.lists(st.tuples(names, st.binary(max_size=64)), max_size=4)), compressed
        )
    elif form == "many":
        data = zipped([(f"a{i}.npy", b"") for i in range(draw(st.sampled_from([1024, 1025])))])
    else:
        data = draw(st.binary(max_size=2048))
    damage = draw(usually(st.just("none"), st.sampled_from(["truncate", "flip", "append"])))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif damage == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    return data


dataset_names = st.one_of(
    st.sampled_from([DATASET, "fuzz-upload"]),
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True),
    texts(giant=False),
    giant_text(),
)


@st.composite
def uploads(draw: st.DrawFn) -> list[dataset_pb2.UploadDatasetRequest]:
    """An upload stream: a header (hostile fields now and then: size, sha256, name,
    format), the file in random chunks, and now and then a misplaced message."""
    data = draw(dataset_bytes())
    digest = hashlib.sha256(data).hexdigest()
    header = dataset_pb2.DatasetHeader(
        name=draw(usually(st.sampled_from(["fuzz-upload", "fuzz-upload-2"]), dataset_names)),
        format=draw(usually(st.sampled_from(["npz", ""]), texts("csv", "NPZ", giant=False))),
        size_bytes=draw(usually(st.sampled_from([0, len(data)]), int64s)),
        sha256=draw(usually(st.sampled_from(["", digest, digest.upper()]), texts(giant=False))),
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    messages = [dataset_pb2.UploadDatasetRequest(header=header)]
    messages += [dataset_pb2.UploadDatasetRequest(chunk=p) for p in pieces]
    stray = draw(
        usually(st.just("none"), st.sampled_from(["no-header", "header", "empty", "first-chunk"]))
    )
    if stray == "no-header":
        messages.pop(0)
    elif stray in ("header", "empty"):
        extra = (
            dataset_pb2.UploadDatasetRequest(header=header)
            if stray == "header"
            else dataset_pb2.UploadDatasetRequest()
        )
        messages.insert(draw(st.integers(1, len(messages))), extra)
    elif stray == "first-chunk":
        messages.insert(0, dataset_pb2.UploadDatasetRequest(chunk=b"PK"))
    return messages


# ---- wire noise -----------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= 2**64 - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wire_field(number: int, wire_type: int, payload: bytes | int) -> bytes:
    tag = varint(number << 3 | wire_type)
    if wire_type == 0:
        assert isinstance(payload, int)
        return tag + varint(payload)
    assert isinstance(payload, bytes)
    if wire_type == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload  # fixed64 (1) and fixed32 (5): the payload is 8 or 4 bytes


field_numbers = st.one_of(st.integers(1, 12), st.sampled_from([15, 16, 2047, 2**29 - 1]))


def wire_messages(max_leaves: int = 12) -> st.SearchStrategy[bytes]:
    """Protobuf wire format with random field numbers, types and payloads (submessages
    of the same, UTF-8 text, or bytes), most of which parse as any message type."""
    leaf = st.one_of(
        st.tuples(field_numbers, st.just(0), int64s),
        st.tuples(field_numbers, st.just(1), st.binary(min_size=8, max_size=8)),
        st.tuples(field_numbers, st.just(5), st.binary(min_size=4, max_size=4)),
        st.tuples(
            field_numbers,
            st.just(2),
            st.one_of(st.text(max_size=16).map(str.encode), st.binary(max_size=16)),
        ),
    ).map(lambda f: wire_field(*f))

    def extend(inner: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
        message = st.lists(inner, max_size=4).map(b"".join)
        return st.one_of(
            message, st.tuples(field_numbers, message).map(lambda f: wire_field(f[0], 2, f[1]))
        )

    return st.recursive(leaf, extend, max_leaves=max_leaves)


def nested_struct_train_request(depth: int) -> bytes:
    """A TrainRequest whose one layer holds a Struct nested ``depth`` levels, as raw bytes
    (past protobuf's parse depth the client library cannot build it as a message)."""
    value = wire_field(1, 0, 0)  # Value.null_value
    for _ in range(depth):
        entry = wire_field(1, 2, b"a") + wire_field(2, 2, value)  # Struct.FieldsEntry
        struct_bytes = wire_field(1, 2, entry)  # Struct.fields
        value = wire_field(5, 2, struct_bytes)  # Value.struct_value
    layer = wire_field(1, 2, wire_field(1, 2, b"type") + wire_field(2, 2, value))
    layer_list = wire_field(1, 2, layer)  # LayerList.layers
    model_spec = wire_field(2, 2, layer_list)  # ModelSpec.layers
    return wire_field(1, 2, b"fuzz-model") + wire_field(2, 2, model_spec)
