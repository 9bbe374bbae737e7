"""03 validation_split: Keras holds out the last part of the training data itself.

python examples/lesson/03_validation_split.py [--small]
"""

from __future__ import annotations

from _common import connect, load_mnist, parse_args, print_history

args = parse_args(__doc__)
client = connect()
(x_train, y_train), _ = load_mnist(args.small)
x_train = x_train / 255.0

# model.fit(x_train, y_train, epochs=5, validation_split=0.2)
job = client.train(
    "lesson-split",
    layers=[
        {"type": "Flatten", "input_shape": [28, 28]},
        {"type": "Dense", "units": 128, "activation": "relu"},
        {"type": "Dense", "units": 10, "activation": "softmax"},
    ],
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    dataset=client.upload_dataset("lesson-mnist-train", x=x_train.astype("float32"), y=y_train),
    validation_split=0.2,
    epochs=args.epochs,
    seed=0,
)
job.wait()
print_history(job.history)  # val_loss and val_accuracy: from the 20% held out
print(f"job {job.state}: validated on {int(len(x_train) * 0.2)} held-out images")
