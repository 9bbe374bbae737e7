"""08 Transfer learning: a stored model's layers frozen and the rest trained on new data,
and a new layer on top of the frozen base (FineTune).

Trains the base first (as 01 does) when lesson-base is not in the store yet.

    python examples/lesson/08_transfer_learning.py [--small]
"""

from __future__ import annotations

from _common import connect, load_mnist, parse_args, print_history

import fitserve

args = parse_args(__doc__)
client = connect()
(x_train, y_train), (x_test, y_test) = load_mnist(args.small)
x_train, x_test = (x_train / 255.0).astype("float32"), (x_test / 255.0).astype("float32")
train = client.upload_dataset("lesson-mnist-train", x=x_train, y=y_train)

try:
    client.get_model("lesson-base")
except fitserve.NotFoundError:
    client.train(
        "lesson-base",
        layers=[
            {"type": "Flatten", "input_shape": [28, 28]},
            {"type": "Dense", "units": 128, "activation": "relu", "name": "features"},
            {"type": "Dense", "units": 10, "activation": "softmax", "name": "classifier"},
        ],
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        dataset=train,
        epochs=args.epochs,
        seed=0,
    ).wait()

# New data: the test images (in real life, the task the base was not trained for).
new = client.upload_dataset("lesson-mnist-new", x=x_test, y=y_test)

# 1. for layer in model.layers[:-1]: layer.trainable = False; then fit on the new data
job = client.fine_tune(
    "lesson-base",
    model_name="lesson-frozen",
    freeze_layers=[0, 1],  # Flatten and "features": only "classifier" trains
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    dataset=new,
    epochs=args.epochs,
    seed=0,
)
result = job.wait()
print_history(job.history)
print(f"frozen base: {job.state}, lesson-frozen version {result.model_version}")

# 2. base = the stored model without its last layer, frozen; a new Dense on top
job = client.fine_tune(
    "lesson-base",
    model_name="lesson-new-top",
    drop_last=1,
    head_layers=[{"type": "Dense", "units": 10, "activation": "softmax", "name": "new_top"}],
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    dataset=new,
    epochs=args.epochs,
    seed=0,
)
result = job.wait()
print_history(job.history)
model = client.get_model("lesson-new-top")
print(
    f"new layer on top: {job.state}, lesson-new-top version {result.model_version}, "
    f"fine-tuned from {model.versions[0].parent_model} v{model.versions[0].parent_version}"
)
