"""02 A model built with keras.Input (the functional API), sent as the Keras model itself.

python examples/lesson/02_functional.py [--small]
"""

from __future__ import annotations

import keras
from _common import connect, load_mnist, parse_args, print_history

args = parse_args(__doc__)
client = connect()
(x_train, y_train), (x_test, y_test) = load_mnist(args.small)
x_train, x_test = x_train / 255.0, x_test / 255.0

inputs = keras.Input(shape=(28, 28), name="image")
x = keras.layers.Flatten()(inputs)
x = keras.layers.Dense(128, activation="relu")(x)
x = keras.layers.Dropout(0.2)(x)
outputs = keras.layers.Dense(10, activation="softmax")(x)
model = keras.Model(inputs=inputs, outputs=outputs, name="mnist_functional")
model.summary()

# The server rebuilds it from its config (model.to_json()), never from pickled code.
job = client.train(
    "lesson-functional",
    model=model,
    optimizer="adam",
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    dataset=client.upload_dataset("lesson-mnist-train", x=x_train.astype("float32"), y=y_train),
    epochs=args.epochs,
    seed=0,
)
result = job.wait()
print_history(job.history)
print(f"job {job.state}: model lesson-functional version {result.model_version}")
print("predictions:", client.predict("lesson-functional", x_test[:5].astype("float32")).argmax(1))
