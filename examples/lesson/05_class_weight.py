"""05 class_weight: errors on the digit 5 count twice as much as on 6.

python examples/lesson/05_class_weight.py [--small]
"""

from __future__ import annotations

from _common import connect, load_mnist, parse_args, print_history

args = parse_args(__doc__)
client = connect()
(x_train, y_train), _ = load_mnist(args.small)
x_train = x_train / 255.0

class_weight = {5: 2.0, 6: 1.0}  # classes not listed weigh 1.0
job = client.train(
    "lesson-class-weight",
    layers=[
        {"type": "Flatten", "input_shape": [28, 28]},
        {"type": "Dense", "units": 128, "activation": "relu"},
        {"type": "Dense", "units": 10, "activation": "softmax"},
    ],
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    dataset=client.upload_dataset("lesson-mnist-train", x=x_train.astype("float32"), y=y_train),
    class_weight=class_weight,
    epochs=args.epochs,
    seed=0,
)
job.wait()
print_history(job.history)
print(f"job {job.state} with class_weight={class_weight}")
