"""06 Callbacks: EarlyStopping, ModelCheckpoint, ReduceLROnPlateau and TensorBoard, then
the job's files (checkpoints, TensorBoard logs) downloaded.

    python examples/lesson/06_callbacks.py [--small]
    tensorboard --logdir lesson-tensorboard    # afterwards, to look at the curves
"""

from __future__ import annotations

from pathlib import Path

from _common import connect, load_mnist, parse_args, print_history

args = parse_args(__doc__)
client = connect()
(x_train, y_train), (x_test, y_test) = load_mnist(args.small)
x_train, x_test = x_train / 255.0, x_test / 255.0

# callbacks = [keras.callbacks.EarlyStopping(...), ModelCheckpoint(...), ...]
callbacks = {
    "early_stopping": {"monitor": "val_loss", "patience": 2, "restore_best_weights": True},
    "model_checkpoint": {"monitor": "val_loss", "save_best_only": True},
    "reduce_lr_on_plateau": {"monitor": "val_loss", "factor": 0.5, "patience": 1},
    "tensorboard": True,
}
job = client.train(
    "lesson-callbacks",
    layers=[
        {"type": "Flatten", "input_shape": [28, 28]},
        {"type": "Dense", "units": 128, "activation": "relu"},
        {"type": "Dense", "units": 10, "activation": "softmax"},
    ],
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
    dataset=client.upload_dataset("lesson-mnist-train", x=x_train.astype("float32"), y=y_train),
    validation_data=client.upload_dataset(
        "lesson-mnist-test", x=x_test.astype("float32"), y=y_test
    ),
    epochs=args.epochs * 2,  # room for EarlyStopping to stop first
    callbacks=callbacks,
    seed=0,
)
job.wait()
print_history(job.history)  # with "learning_rate": ReduceLROnPlateau's changes
print(f"job {job.state} after {len(job.epochs)} epochs")

artifacts = client.list_artifacts(job.id)
for artifact in artifacts:
    print(f"  {artifact.path} ({artifact.size_bytes} bytes)")
logs = Path("lesson-tensorboard")
for artifact in artifacts:
    if artifact.path.startswith("tensorboard/"):
        target = logs / artifact.path
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_artifact(job.id, artifact.path, target)
print(f"TensorBoard logs in {logs}/: tensorboard --logdir {logs}")
