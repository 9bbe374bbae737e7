"""07 Custom losses the three ways, and a custom metric, through the example plugins
(examples/plugins, installed on the server and workers by `make install`):

- a loss function:                 examples>huber_fn
- a Loss subclass with a parameter: examples>huber (delta)
- an add_loss endpoint layer:       examples>LogisticEndpoint (no loss= at all)
- a Metric subclass:                examples>CategoricalTruePositives

    python examples/lesson/07_custom_losses.py [--small]
"""

from __future__ import annotations

import keras
import numpy as np
from _common import connect, load_mnist, parse_args, print_history
from fitserve_examples.layers import LogisticEndpoint

import fitserve
from fitserve.v1 import training_pb2

args = parse_args(__doc__)
client = connect()
print("plugins:", ", ".join(p.name for p in client.list_plugins().plugins))
(x_train, y_train), _ = load_mnist(args.small)
x = (x_train / 255.0).reshape(len(x_train), -1).astype("float32")
onehot = np.eye(10, dtype="float32")[y_train]
ds = client.upload_dataset("lesson-mnist-onehot", x=x, y=onehot)
mlp = [
    {"type": "Dense", "units": 64, "activation": "relu", "input_shape": [784]},
    {"type": "Dense", "units": 10, "activation": "softmax"},
]

# 1. model.compile(loss=huber_fn): a function
job = client.train(
    "lesson-huber-fn", layers=mlp, loss="examples>huber_fn", dataset=ds, epochs=args.epochs, seed=0
)
job.wait()
print("huber_fn:", job.state)
print_history(job.history)

# 2. model.compile(loss=HuberLoss(delta=2.0)) and a custom metric
job = client.train(
    "lesson-huber",
    layers=mlp,
    loss=fitserve.plugin("examples>huber", delta=2.0),
    metrics=["accuracy", "examples>CategoricalTruePositives"],
    dataset=ds,
    epochs=args.epochs,
    seed=0,
)
job.wait()
print("huber(delta=2.0) with CategoricalTruePositives:", job.state)
print_history(job.history)

# 3. add_loss: an endpoint layer computes the loss from the targets, given as an input
inputs = keras.Input((784,), name="x")
targets = keras.Input((1,), name="targets")
logits = keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(inputs))
model = keras.Model({"x": inputs, "targets": targets}, LogisticEndpoint()(targets, logits))
is_zero = (y_train == 0).astype("float32").reshape(-1, 1)  # a binary task: "is it a 0?"
ds = client.upload_dataset("lesson-mnist-is-zero", x=x, targets=is_zero)
ref = training_pb2.DatasetRef(dataset=ds.id, input_keys=["x", "targets"])
job = client.train("lesson-endpoint", model=model, dataset=ref, epochs=args.epochs, seed=0)
job.wait()
print("LogisticEndpoint (add_loss, no loss=):", job.state)
print_history(job.history)  # endpoint_accuracy: the metric the layer holds
print(
    "P(zero) of 3 images:",
    np.asarray(client.predict("lesson-endpoint", inputs={"x": x[:3]})).ravel().round(3),
)
