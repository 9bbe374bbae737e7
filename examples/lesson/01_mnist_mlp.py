"""01 The MNIST MLP: Sequential, compile, fit with validation_data, evaluate, predict, and
the saved model back from the store (a downloaded checkpoint loaded with Keras).

    python examples/lesson/01_mnist_mlp.py [--small]
"""

from __future__ import annotations

import tempfile

import numpy as np
from _common import connect, load_mnist, parse_args, print_history

args = parse_args(__doc__)
client = connect()

# Load and prepare the data: pixels 0..255 -> 0..1
(x_train, y_train), (x_test, y_test) = load_mnist(args.small)
x_train, x_test = x_train / 255.0, x_test / 255.0
train = client.upload_dataset("lesson-mnist-train", x=x_train.astype("float32"), y=y_train)
test = client.upload_dataset("lesson-mnist-test", x=x_test.astype("float32"), y=y_test)

# model = keras.models.Sequential([...]): the same layers, as the server builds them
model = [
    {"type": "Flatten", "input_shape": [28, 28]},
    {"type": "Dense", "units": 128, "activation": "relu"},
    {"type": "Dropout", "rate": 0.2},
    {"type": "Dense", "units": 10, "activation": "softmax"},
]

# model.compile(...) and model.fit(x_train, y_train, epochs=5, validation_data=(x_test, y_test))
job = client.train(
    "lesson-mlp",
    layers=model,
    optimizer="adam",
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    dataset=train,
    validation_data=test,
    epochs=args.epochs,
    callbacks={"model_checkpoint": {"save_best_only": False}},  # a model.keras per epoch
    seed=0,
)
result = job.wait()
print_history(job.history)
print(f"job {job.state}: model lesson-mlp version {result.model_version}")

# model.evaluate(x_test, y_test)
evaluation = client.evaluate("lesson-mlp", dataset=test, version=result.model_version).wait()
loss, accuracy = evaluation.metrics["loss"], evaluation.metrics["accuracy"]
print(f"Test loss: {loss:.4f} - Test accuracy: {accuracy:.4f}")

# model.predict(x_test[:5]): probabilities, one row per image
probabilities = client.predict("lesson-mlp", x_test[:5].astype("float32"))
print("predictions:", probabilities.argmax(axis=1), "labels:", y_test[:5])

# Saving and loading: every version is kept in the store (a SavedModel and model.keras),
# served by version; the job's checkpoints are files you download and load with Keras.
stored = client.get_model("lesson-mlp")
print("stored versions:", [v.version for v in stored.versions])
same = client.predict("lesson-mlp", x_test[:5].astype("float32"), version=result.model_version)
print("version", result.model_version, "predicts the same:", bool(np.allclose(same, probabilities)))

import keras  # noqa: E402  (only here: the steps above need no Keras on the client)

checkpoints = [a.path for a in client.list_artifacts(job.id) if a.path.endswith(".keras")]
with tempfile.TemporaryDirectory() as folder:
    path = client.download_artifact(job.id, checkpoints[-1], folder)
    loaded = keras.models.load_model(path)
    local = loaded.predict(x_test[:5].astype("float32"), verbose=0)
print(
    f"downloaded {checkpoints[-1]}; loaded with keras.models.load_model, it predicts",
    local.argmax(axis=1),
)
