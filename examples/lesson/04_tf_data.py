"""04 tf.data: a Dataset built and saved with tf.data.Dataset.save, trained on by URI (the
worker reads the folder; nothing is uploaded).

The folder must lie under the server's FITSERVE_DATASET_ROOTS (default: <data>/external),
so run this on the machine of `make run`.

    python examples/lesson/04_tf_data.py [--small]
"""

from __future__ import annotations

import tensorflow as tf
from _common import connect, data_dir, load_mnist, parse_args, print_history

args = parse_args(__doc__)
client = connect()
(x_train, y_train), _ = load_mnist(args.small)
x_train = (x_train / 255.0).astype("float32")

# train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)), saved for the workers
train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train.astype("int64")))
folder = data_dir() / "external" / ("lesson-mnist-small" if args.small else "lesson-mnist")
train_ds.save(str(folder))
print(f"saved {train_ds.cardinality().numpy()} examples to {folder}")

# model.fit(train_ds.shuffle(...).batch(32), epochs=5): the worker shuffles and batches
job = client.train(
    "lesson-tfdata",
    layers=[
        {"type": "Flatten", "input_shape": [28, 28]},
        {"type": "Dense", "units": 128, "activation": "relu"},
        {"type": "Dense", "units": 10, "activation": "softmax"},
    ],
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    dataset=str(folder),  # a path: a DatasetRef by URI
    batch_size=32,
    epochs=args.epochs,
    seed=0,
)
job.wait()
print_history(job.history)
print(f"job {job.state}: trained from {folder}")
