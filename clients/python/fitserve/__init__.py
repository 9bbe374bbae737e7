"""fitserve SDK: train, evaluate, fine-tune and serve Keras models over gRPC.

    import fitserve
    client = fitserve.Client("localhost:50051")
    job = client.train("mnist-mlp", layers=[...], loss="sparse_categorical_crossentropy",
                       dataset=client.upload_dataset("mnist-train", x=x, y=y), epochs=5)
    job.wait()
    probs = client.predict("mnist-mlp", x_test)

For asyncio services, `fitserve.AsyncClient` has the same calls, awaited (`job = await
client.train(...)`, `await job.wait()`); both clients take an existing channel
(`channel=`), which they then never close.

A server with TLS and tokens: `fitserve.Client(target, token="fst_...",
tls=fitserve.TlsOptions(ca="ca.pem"))`, or FITSERVE_TOKEN and FITSERVE_TLS_CA set.

Custom losses, metrics, layers and callbacks run as server-side plugins, named in requests
(`loss=fitserve.plugin("examples>huber", delta=2.0)`); `client.list_plugins()` lists them.

The wire contract (request and response messages, stubs) is in `fitserve.v1`.
"""

from importlib import metadata as _metadata

from fitserve._async import AsyncClient, AsyncJob
from fitserve._client import Client, Prediction
from fitserve._credentials import TlsOptions
from fitserve._errors import (
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FitserveError,
    InternalError,
    InvalidArgumentError,
    JobCancelledError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from fitserve._job import Job
from fitserve._options import TrainingOptions
from fitserve._specs import PluginRef, plugin
from fitserve._states import JobState
from fitserve._tensors import to_numpy, to_tensor

try:
    __version__ = _metadata.version("fitserve")
except _metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncJob",
    "CancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FitserveError",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobCancelledError",
    "JobFailedError",
    "JobState",
    "NotFoundError",
    "PermissionDeniedError",
    "PluginRef",
    "Prediction",
    "ResourceExhaustedError",
    "TlsOptions",
    "TrainingOptions",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "plugin",
    "to_numpy",
    "to_tensor",
]

# Public names say they live here (for tracebacks and docs), like httpx does.
for _name in __all__:
    _member = globals()[_name]
    if hasattr(_member, "__module__") and not isinstance(_member, str):
        _member.__module__ = "fitserve"
del _name, _member
