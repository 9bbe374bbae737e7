"""The `fitserve` command: start the stack, or drive a running server from a shell.

`up`, `serve` and `worker` hand over to the server package (`service.main`) in this same
Python, so the SDK never imports server code; every other command is a thin layer over
`fitserve.Client`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from fitserve import _specs
from fitserve._client import Client
from fitserve._credentials import CA_ENV, CERT_ENV, KEY_ENV, TLS_ENV, TOKEN_ENV, TlsOptions
from fitserve._errors import FitserveError
from fitserve._job import WATCH_RETRY_SECONDS
from fitserve.v1 import training_pb2

__all__ = ["main"]

_SERVER_COMMANDS = {
    "up": "run the whole stack on this machine: Redis, server and worker",
    "serve": "run a server process (API and/or inference roles)",
    "worker": "run a Celery worker process",
    "tokens": "create, list and revoke API tokens (an operator's command: talks to Redis)",
}
_GLOBAL_OPTIONS_WITH_VALUE = ("--target", "--timeout", "--token", "--ca", "--cert", "--key")
_Command = Callable[[Client, argparse.Namespace], int]
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line in `argv` (default: sys.argv) and return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    server_command = _server_command(arguments)
    if server_command is not None:
        command, rest = server_command
        return _exec_server(command, rest)
    args = _parser().parse_args(arguments)
    command_function: _Command = args.run
    try:
        with Client(
            args.target,
            timeout=args.timeout,
            token=args.token or "",
            tls=_tls(args),
            watch_retry_seconds=getattr(args, "retry_for", WATCH_RETRY_SECONDS),
        ) as client:
            return command_function(client, args)
    except FitserveError as error:
        return _fail(error.details)
    except (OSError, ValueError, TypeError) as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


# -- server processes ----------------------------------------------------------------


def _server_command(arguments: list[str]) -> tuple[str, list[str]] | None:
    """The server subcommand and its own arguments, skipping global options before it."""
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument in _SERVER_COMMANDS:
            return argument, arguments[index + 1 :]
        if not argument.startswith("-"):
            return None
        index += 2 if argument in _GLOBAL_OPTIONS_WITH_VALUE else 1
    return None


def _exec_server(command: str, rest: list[str]) -> int:
    """Replace this process with `python -m service.main <command> ...` when installed."""
    if importlib.util.find_spec("service") is None:
        print(
            f"fitserve {command} needs the server package: "
            "run 'make install' in the fitserve repository",
            file=sys.stderr,
        )
        return 2
    os.execv(sys.executable, [sys.executable, "-m", "service.main", command, *rest])
    return 0  # only reached when execv is replaced (tests)


# -- argument parsing ----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fitserve", description="Train, evaluate, fine-tune and serve Keras models."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("FITSERVE_TARGET", "localhost:50051"),
        help="server address host:port (default: $FITSERVE_TARGET or localhost:50051)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per call (default: 60)"
    )
    _add_credential_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in _SERVER_COMMANDS.items():
        commands.add_parser(name, help=help_text)
    _add_dataset_commands(commands)
    _add_job_commands(commands)
    _add_model_commands(commands)
    _add_predict_command(commands)
    _add_plugins_command(commands)
    return parser


def _add_credential_options(parser: argparse.ArgumentParser) -> None:
    """--token and the TLS options, each defaulting to its environment variable (the
    token's default is never shown: help output is no place for it)."""
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV, ""),
        help=f"bearer token sent with every call (default: ${TOKEN_ENV}; prefer the "
        "variable: a command line is visible to other users)",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"TLS with the system's root certificates, or with --ca (default: ${TLS_ENV}=1, "
        "or on when --ca/--cert/--key are given; --no-tls: plaintext, whatever is set)",
    )
    for option, env, what in (
        ("--ca", CA_ENV, "CA certificates (PEM) to trust instead of the system's"),
        ("--cert", CERT_ENV, "client certificate chain (PEM), for mutual TLS"),
        ("--key", KEY_ENV, "private key (PEM) of --cert"),
    ):
        parser.add_argument(
            option, metavar="FILE", default=os.environ.get(env) or None, help=f"{what} (${env})"
        )


def _tls(args: argparse.Namespace) -> TlsOptions | bool:
    """TLS as the options (and their environment defaults) ask: --no-tls wins, then any
    file turns TLS on, then --tls (or FITSERVE_TLS=1) alone means the system's roots."""
    if args.tls is False:
        return False
    if args.ca or args.cert or args.key:
        return TlsOptions(ca=args.ca, cert=args.cert, key=args.key)
    if args.tls:
        return True
    return TlsOptions.from_env({TLS_ENV: os.environ.get(TLS_ENV, "")}) is not None


def _group(commands: _Subparsers, name: str, help_text: str) -> _Subparsers:
    parser = commands.add_parser(name, help=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def _add_dataset_commands(commands: _Subparsers) -> None:
    datasets = _group(commands, "datasets", "upload and list datasets")
    upload = datasets.add_parser("upload", help="upload an .npz file")
    upload.add_argument("name")
    upload.add_argument("file", metavar="FILE.npz")
    upload.set_defaults(run=_upload_dataset)
    datasets.add_parser("list", help="list datasets").set_defaults(run=_list_datasets)


def _add_job_commands(commands: _Subparsers) -> None:
    jobs = _group(commands, "jobs", "follow and cancel training jobs")
    for name, run, help_text in (
        ("get", _get_job, "show one job"),
        ("watch", _watch_job, "print a job's events until it ends"),
        ("cancel", _cancel_job, "cancel a job"),
    ):
        parser = jobs.add_parser(name, help=help_text)
        parser.add_argument("job_id", metavar="ID")
        parser.set_defaults(run=run)
        if name == "watch":
            parser.add_argument(
                "--retry-for",
                type=float,
                default=WATCH_RETRY_SECONDS,
                metavar="SECONDS",
                help="ride out an outage (server restarting, Redis down) this long, resuming "
                f"where the stream stopped, before giving up (default: {WATCH_RETRY_SECONDS:g})",
            )
    artifacts = jobs.add_parser(
        "artifacts", help="list the files a job wrote (checkpoints, logs, history.csv)"
    )
    artifacts.add_argument("job_id", metavar="ID")
    artifacts.set_defaults(run=_list_artifacts)
    download = jobs.add_parser("download", help="download one of a job's files")
    download.add_argument("job_id", metavar="ID")
    download.add_argument("path", help="as `fitserve jobs artifacts` lists it")
    download.add_argument(
        "-o", "--output", default=".", help="file or folder to write (default: here)"
    )
    download.set_defaults(run=_download_artifact)
    listing = jobs.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--state", help="e.g. RUNNING, SUCCEEDED, FAILED")
    listing.add_argument("--kind", help="train, evaluate or fine_tune")
    listing.add_argument("--model", default="", help="only jobs of this model")
    listing.add_argument(
        "--full",
        action="store_true",
        help="each job whole, request body (request_json) included, as JSON lines instead "
        "of the table",
    )
    listing.set_defaults(run=_list_jobs)


def _add_model_commands(commands: _Subparsers) -> None:
    models = _group(commands, "models", "inspect the model registry")
    models.add_parser("list", help="list models").set_defaults(run=_list_models)
    get = models.add_parser("get", help="show a model's versions and aliases")
    get.add_argument("name")
    get.set_defaults(run=_get_model)


def _add_predict_command(commands: _Subparsers) -> None:
    predict = commands.add_parser("predict", help="run a model on the arrays in a file")
    predict.add_argument("model")
    predict.add_argument(
        "file",
        metavar="FILE.npy",
        help=".npy (the only input) or .npz (inputs by name, or one array: the only input)",
    )
    selector = predict.add_mutually_exclusive_group()
    selector.add_argument("--version", type=int, help="exact version (default: stable/latest)")
    selector.add_argument("--alias", help='alias such as "canary"')
    predict.add_argument("--output", "-o", help="save the outputs to this .npy/.npz file")
    predict.set_defaults(run=_predict)


def _add_plugins_command(commands: _Subparsers) -> None:
    plugins = commands.add_parser(
        "plugins", help="list the server-side plugins (losses, metrics, layers, callbacks)"
    )
    plugins.add_argument("--kind", help="only loss, metric, layer or callback plugins")
    plugins.add_argument(
        "--json", action="store_true", help="print the whole answer (params, docs) as JSON"
    )
    plugins.set_defaults(run=_list_plugins)


# -- commands ------------------------------------------------------------------------


def _upload_dataset(client: Client, args: argparse.Namespace) -> int:
    _print_json(client.upload_dataset_file(args.name, args.file))
    return 0


def _list_datasets(client: Client, args: argparse.Namespace) -> int:
    rows = (
        (d.name, d.id, str(d.num_examples), str(d.size_bytes), _time(d.created_at))
        for d in client.list_datasets()
    )
    _print_table(("NAME", "ID", "EXAMPLES", "BYTES", "CREATED"), rows)
    return 0


def _get_job(client: Client, args: argparse.Namespace) -> int:
    _print_json(client.get_job(args.job_id).info)
    return 0


def _list_jobs(client: Client, args: argparse.Namespace) -> int:
    view = "full" if args.full else "basic"
    jobs = client.list_jobs(state=args.state, model_name=args.model, kind=args.kind, view=view)
    if args.full:
        for job in jobs:
            print(json_format.MessageToJson(job, preserving_proto_field_name=True, indent=None))
        return 0
    _print_table(("ID", "KIND", "STATE", "MODEL", "VERSION", "CREATED"), map(_job_row, jobs))
    return 0


def _job_row(job: training_pb2.Job) -> tuple[str, ...]:
    kind = _enum_name(training_pb2.JobKind, job.kind)
    state = _enum_name(training_pb2.JobState, job.state)
    version = str(job.model_version or "")
    return (job.id, kind, state, job.model_name, version, _time(job.created_at))


def _watch_job(client: Client, args: argparse.Namespace) -> int:
    job = client.get_job(args.job_id)
    for event in job.events():
        print(_describe_event(event), flush=True)
    info = job.wait()
    print(f"job {info.id} SUCCEEDED{_version_suffix(info.model_version)}")
    return 0


def _list_artifacts(client: Client, args: argparse.Namespace) -> int:
    rows = (
        (a.path, str(a.size_bytes), _time(a.modified_at))
        for a in client.list_artifacts(args.job_id)
    )
    _print_table(("PATH", "BYTES", "MODIFIED"), rows)
    return 0


def _download_artifact(client: Client, args: argparse.Namespace) -> int:
    written = client.download_artifact(args.job_id, args.path, args.output)
    print(written)
    return 0


def _cancel_job(client: Client, args: argparse.Namespace) -> int:
    info = client.cancel_job(args.job_id)
    print(f"job {info.id}: {_enum_name(training_pb2.JobState, info.state)}")
    return 0


def _list_models(client: Client, args: argparse.Namespace) -> int:
    rows = (
        (m.name, str(m.latest_version), str(m.version_count), _aliases(m.aliases))
        for m in client.list_models()
    )
    _print_table(("NAME", "LATEST", "VERSIONS", "ALIASES"), rows)
    return 0


def _get_model(client: Client, args: argparse.Namespace) -> int:
    _print_json(client.get_model(args.name))
    return 0


def _predict(client: Client, args: argparse.Namespace) -> int:
    x, inputs = _load_inputs(args.file)
    prediction = client.predict_full(
        args.model, x, inputs=inputs, version=args.version, alias=args.alias
    )
    if args.output:
        _save_outputs(args.output, prediction.outputs)
    else:
        _print_outputs(prediction.outputs)
    return 0


def _list_plugins(client: Client, args: argparse.Namespace) -> int:
    response = client.list_plugins(args.kind)
    if args.json:
        _print_json(response)
    else:
        _print_plugins(response)
    return 0


def _print_plugins(response: training_pb2.ListPluginsResponse) -> None:
    """The plugins as a table on stdout, then each failed plugin source on stderr."""
    rows = (
        (p.name, p.kind, p.form, _plugin_signature(p), _provided_by(p)) for p in response.plugins
    )
    _print_table(("NAME", "KIND", "FORM", "SIGNATURE", "PROVIDED BY"), rows)
    for failure in response.failures:
        print(f"failed to load: {failure.source}: {failure.error}", file=sys.stderr)


def _plugin_signature(plugin: training_pb2.Plugin) -> str:
    if plugin.signature:
        return plugin.signature
    return "(" + ", ".join(_param_text(param) for param in plugin.params) + ")"


def _param_text(param: training_pb2.PluginParam) -> str:
    text = param.name + (f": {param.type}" if param.type else "")
    if param.required:
        return text
    default = json_format.MessageToJson(param.default, indent=None)
    return f"{text} = {default}"


def _provided_by(plugin: training_pb2.Plugin) -> str:
    source = plugin.distribution or plugin.package or plugin.module
    return f"{source} {plugin.version}".strip()


# -- input and output ----------------------------------------------------------------


def _load_inputs(
    path: str,
) -> tuple[npt.NDArray[Any] | None, dict[str, npt.NDArray[Any]] | None]:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    if len(arrays) == 1:  # one array is the model's only input, whatever it is called
        return next(iter(arrays.values())), None
    return None, arrays


def _save_outputs(path: str, outputs: Mapping[str, npt.NDArray[Any]]) -> None:
    if len(outputs) == 1:
        np.save(path, next(iter(outputs.values())), allow_pickle=False)
    else:
        Path(path).write_bytes(_specs.npz_bytes(outputs))


def _print_outputs(outputs: Mapping[str, npt.NDArray[Any]]) -> None:
    if len(outputs) == 1:
        print(next(iter(outputs.values())))
        return
    for name, array in outputs.items():
        print(f"{name}:\n{array}")


def _print_json(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True))


def _print_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def _describe_event(event: training_pb2.JobEvent) -> str:
    """One line for a person following a job: state changes, epochs, batches, logs,
    thresholds reached."""
    payload = event.WhichOneof("payload")
    if payload == "state_changed":
        return _describe_state(event.state_changed)
    if payload == "epoch_ended":
        epoch = event.epoch_ended
        return f"epoch {epoch.epoch}/{epoch.epochs}: {_logs(epoch.logs)}"
    if payload == "batch_progress":
        batch = event.batch_progress
        total = f"/{batch.batches}" if batch.batches else ""
        return f"epoch {batch.epoch} batch {batch.batch}{total}: {_logs(batch.logs)}"
    if payload == "log":
        return f"[{event.log.level}] {event.log.message}"
    if payload == "threshold":
        return _describe_threshold(event.threshold)
    return f"event {event.event_id}"


def _describe_threshold(reached: training_pb2.ThresholdReached) -> str:
    comparison = "<=" if reached.mode == "min" else ">="
    text = (
        f"threshold {reached.monitor} {comparison} {reached.value:g} reached at epoch "
        f"{reached.epoch} ({reached.observed:.4g})"
    )
    return text + ("; stopping" if reached.stopped else "")


def _describe_state(change: training_pb2.StateChanged) -> str:
    text = f"state {_enum_name(training_pb2.JobState, change.state)}"
    if change.error.message:
        return f"{text}: {change.error.message}"
    if change.metrics:
        text = f"{text}: {_logs(change.metrics)}"
    return text + _version_suffix(change.model_version)


def _logs(logs: Mapping[str, float]) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in sorted(logs.items()))


def _version_suffix(version: int) -> str:
    return f" (version {version})" if version else ""


def _aliases(aliases: Mapping[str, int]) -> str:
    return ",".join(f"{alias}={version}" for alias, version in sorted(aliases.items()))


def _enum_name(enum_type: Any, value: int) -> str:
    name: str = enum_type.Name(value)
    return name.split("_", 2)[-1]


def _time(timestamp: timestamp_pb2.Timestamp) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return ""
    return timestamp.ToDatetime().isoformat(timespec="seconds")
