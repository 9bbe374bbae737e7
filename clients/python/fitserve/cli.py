"""The `fitserve` command: start the stack, or drive a running server from a shell.

`up`, `serve` and `worker` hand over to the server package (`service.main`) in this same
Python, so the SDK never imports server code; every other command is a thin layer over
`fitserve.Client`. Every such command prints a human-readable table or summary, or with
`--json` one JSON document for scripts, and ends with one of the `EXIT_*` statuses below.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import descriptor, json_format, timestamp_pb2
from google.protobuf.message import Message

from fitserve import _cli_specs, _specs
from fitserve._cli_specs import LocalDataset, SpecError
from fitserve._client import Client
from fitserve._credentials import (
    CA_ENV,
    CERT_ENV,
    DEFAULT_TARGET,
    KEY_ENV,
    TARGET_ENV,
    TLS_ENV,
    TOKEN_ENV,
    TlsOptions,
    resolve_target,
)
from fitserve._errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    FitserveError,
    InvalidArgumentError,
    JobCancelledError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from fitserve._job import WATCH_RETRY_SECONDS, Job
from fitserve._states import JobState
from fitserve.v1 import training_pb2

__all__ = [
    "EXIT_AUTH",
    "EXIT_BAD_INPUT",
    "EXIT_CONFLICT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "exit_code",
    "main",
]

# -- exit statuses: stable, for scripts (README "Exit codes"; `fitserve --help`) ---------

EXIT_OK = 0
"""The command did what it was asked (a followed job SUCCEEDED)."""
EXIT_JOB_FAILED = 1
"""The job failed or was cancelled, or a confirmation was answered no."""
EXIT_BAD_INPUT = 2
"""Bad input: usage, a spec file, a local file, or the server's INVALID_ARGUMENT."""
EXIT_NOT_FOUND = 3
"""NOT_FOUND: no such model, version, alias, job or dataset."""
EXIT_AUTH = 4
"""UNAUTHENTICATED or PERMISSION_DENIED: a missing, bad or too weak token."""
EXIT_UNAVAILABLE = 5
"""UNAVAILABLE or DEADLINE_EXCEEDED: the server cannot be reached or did not answer."""
EXIT_CONFLICT = 6
"""FAILED_PRECONDITION, ALREADY_EXISTS or RESOURCE_EXHAUSTED: the wrong state (a
finished job, an alias on the version), a clash, a full queue or a quota."""
EXIT_ERROR = 7
"""Any other server error: INTERNAL, UNIMPLEMENTED, DATA_LOSS, UNKNOWN, ..."""
EXIT_INTERRUPTED = 130
"""Ctrl-C: stopped watching a job (it goes on running), or stopped a command."""

_EXIT_BY_ERROR: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    ((JobFailedError, JobCancelledError), EXIT_JOB_FAILED),
    (InvalidArgumentError, EXIT_BAD_INPUT),
    (NotFoundError, EXIT_NOT_FOUND),
    ((UnauthenticatedError, PermissionDeniedError), EXIT_AUTH),
    ((UnavailableError, DeadlineExceededError, TimeoutError), EXIT_UNAVAILABLE),
    ((FailedPreconditionError, AlreadyExistsError, ResourceExhaustedError), EXIT_CONFLICT),
    (FitserveError, EXIT_ERROR),
    # local mistakes: a spec, a file, an argument the SDK refuses before sending
    ((SpecError, OSError, ValueError, TypeError), EXIT_BAD_INPUT),
)

_EXIT_CODES_HELP = f"""\
exit status:
  {EXIT_OK}    success (a followed job SUCCEEDED)
  {EXIT_JOB_FAILED}    the job FAILED or was CANCELLED, or a confirmation was answered no
  {EXIT_BAD_INPUT}    bad input: usage, spec file, local file, INVALID_ARGUMENT
  {EXIT_NOT_FOUND}    not found: NOT_FOUND
  {EXIT_AUTH}    authentication or permission: UNAUTHENTICATED, PERMISSION_DENIED
  {EXIT_UNAVAILABLE}    unavailable: UNAVAILABLE, DEADLINE_EXCEEDED, connection refused
  {EXIT_CONFLICT}    precondition or conflict: FAILED_PRECONDITION, ALREADY_EXISTS,
       RESOURCE_EXHAUSTED
  {EXIT_ERROR}    any other server error (INTERNAL, UNIMPLEMENTED, DATA_LOSS, ...)
  {EXIT_INTERRUPTED}  Ctrl-C: stopped watching (the job goes on running) or stopped

Errors print one line, "error: ...", on stderr. Every command takes --json: one JSON
document on stdout instead of the tables."""


def exit_code(error: BaseException) -> int:
    """The exit status of a command that raised `error` (see the EXIT_* constants)."""
    for types, code in _EXIT_BY_ERROR:
        if isinstance(error, types):
            return code
    return EXIT_ERROR


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
        return _fail(error.details, exit_code(error))
    except (OSError, ValueError, TypeError) as error:
        return _fail(_local_message(error), exit_code(error))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _local_message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


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
        return EXIT_BAD_INPUT
    os.execv(sys.executable, [sys.executable, "-m", "service.main", command, *rest])
    return EXIT_OK  # only reached when execv is replaced (tests)


# -- argument parsing ----------------------------------------------------------------

_JSON = argparse.ArgumentParser(add_help=False)
_JSON.add_argument(
    "--json",
    action="store_true",
    default=argparse.SUPPRESS,  # not given here: the global --json (or False) stands
    help="print one JSON document on stdout (for scripts) instead of tables and text",
)
_YES = argparse.ArgumentParser(add_help=False)
_YES.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def _follow_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--detach",
        "-d",
        action="store_true",
        help="print the job id and return at once (follow it later: fitserve jobs watch ID)",
    )
    parent.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="while following: 1 an Epoch line and a progress bar per epoch (default), "
        "2 one line per epoch, 0 nothing",
    )
    return parent


def _add_retry_for(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retry-for",
        type=float,
        default=WATCH_RETRY_SECONDS,
        metavar="SECONDS",
        help="while following: ride out an outage (server restarting, Redis down) this "
        "long, resuming where the stream stopped, before giving up (default: "
        f"{WATCH_RETRY_SECONDS:g})",
    )


_FOLLOW = _follow_options()
_add_retry_for(_FOLLOW)
_FOLLOW_EPILOG = (
    "The job is followed until it ends (exit status 0 when it SUCCEEDED, 1 when it FAILED "
    "or was CANCELLED). Ctrl-C asks, on a terminal, whether to cancel the job (c) or just "
    "stop watching (w: it goes on running; resume with fitserve jobs watch ID); without a "
    "terminal it stops watching. See fitserve --help for every exit status."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fitserve",
        description="Train, evaluate, fine-tune and serve Keras models.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        default=resolve_target(None),  # as Client() resolves it
        help=f"server address host:port (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per call (default: 60)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False,
        help="print one JSON document on stdout instead of tables (also after a command)",
    )
    _add_credential_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in _SERVER_COMMANDS.items():
        commands.add_parser(name, help=help_text)
    _add_training_commands(commands)
    _add_dataset_commands(commands)
    _add_job_commands(commands)
    _add_model_commands(commands)
    _add_predict_commands(commands)
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


def _command(
    commands: _Subparsers,
    name: str,
    run: _Command,
    help_text: str,
    *parents: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """A leaf command: it takes --json (and `parents`' options) and runs `run`."""
    parser = commands.add_parser(name, help=help_text, parents=[_JSON, *parents])
    parser.set_defaults(run=run)
    return parser


def _add_training_commands(commands: _Subparsers) -> None:
    train = _command(
        commands,
        "train",
        _train,
        "train a model from a spec file (YAML or JSON) and follow the job",
        _FOLLOW,
    )
    train.epilog = _FOLLOW_EPILOG
    train.add_argument(
        "spec",
        metavar="SPEC",
        help="a .yaml/.yml or .json file: the keyword arguments of Client.train (model_name, "
        "layers or model, dataset, loss, epochs, ...); relative paths in it are read from "
        "its folder",
    )
    train.add_argument("--model-name", help="publish under this name instead of the spec's")
    train.add_argument(
        "--dataset", help="instead of the spec's: a local .npz (uploaded), a dataset name or a URI"
    )
    train.add_argument("--dataset-name", help="upload a local .npz dataset under this name")
    train.add_argument("--epochs", type=int, help="instead of the spec's epochs")

    fine_tune = _command(
        commands,
        "fine-tune",
        _fine_tune,
        "fine-tune a stored version on new data and follow the job",
        _FOLLOW,
    )
    fine_tune.epilog = _FOLLOW_EPILOG
    fine_tune.add_argument("model", metavar="MODEL[:VERSION|@ALIAS]", help="the base version")
    fine_tune.add_argument(
        "--spec",
        metavar="SPEC",
        help="a .yaml/.json file of Client.fine_tune's keyword arguments (dataset, "
        "train_last_n_layers or new_head or ..., loss, epochs, ...); options below win",
    )
    fine_tune.add_argument("--dataset", help="a local .npz (uploaded), a dataset name or a URI")
    fine_tune.add_argument("--dataset-name", help="upload a local .npz dataset under this name")
    fine_tune.add_argument(
        "--model-name", help="publish under this name (default: the base model's)"
    )
    fine_tune.add_argument(
        "--train-last-n-layers", type=int, metavar="N", help="train only the last N layers"
    )
    fine_tune.add_argument(
        "--new-head", type=int, metavar="CLASSES", help="freeze the base, add a softmax head"
    )
    fine_tune.add_argument(
        "--freeze-layers",
        metavar="A,B,...",
        help="freeze exactly these layers: names or indices (negative from the end)",
    )
    fine_tune.add_argument("--loss", help='e.g. "sparse_categorical_crossentropy"')
    fine_tune.add_argument("--optimizer", help='e.g. "adam"')
    fine_tune.add_argument("--metrics", metavar="A,B,...", help='e.g. "accuracy"')
    fine_tune.add_argument("--epochs", type=int)
    fine_tune.add_argument("--batch-size", type=int)

    evaluate = _command(
        commands,
        "evaluate",
        _evaluate,
        "evaluate a stored version on a dataset and follow the job",
        _FOLLOW,
    )
    evaluate.epilog = _FOLLOW_EPILOG
    evaluate.add_argument(
        "model", metavar="MODEL[:VERSION|@ALIAS]", help="default: the stable alias, else latest"
    )
    evaluate.add_argument(
        "--dataset", required=True, help="a local .npz (uploaded), a dataset name or a URI"
    )
    evaluate.add_argument("--dataset-name", help="upload a local .npz dataset under this name")
    evaluate.add_argument("--batch-size", type=int, default=32, help="default: 32")
    evaluate.add_argument("--queue", default="", help="the worker queue (default: the default)")
    evaluate.add_argument(
        "--time-limit", type=int, metavar="SECONDS", help="bound the job's run on the worker"
    )


def _add_dataset_commands(commands: _Subparsers) -> None:
    datasets = _group(commands, "datasets", "upload, list and delete datasets")
    upload = _command(datasets, "upload", _upload_dataset, "upload an .npz file")
    upload.add_argument("name")
    upload.add_argument("file", metavar="FILE.npz")
    _command(datasets, "list", _list_datasets, "list datasets")
    get = _command(datasets, "get", _get_dataset, "show one dataset")
    get.add_argument("name", metavar="NAME|ID")
    delete = _command(
        datasets,
        "delete",
        _delete_dataset,
        "delete a dataset name (an id: every name of that content)",
        _YES,
    )
    delete.add_argument("name", metavar="NAME|ID")


def _add_job_commands(commands: _Subparsers) -> None:
    jobs = _group(commands, "jobs", "follow and cancel training jobs")
    get = _command(jobs, "get", _get_job, "show one job")
    get.add_argument("job_id", metavar="ID")
    watch = _command(jobs, "watch", _watch_job, "print a job's events until it ends")
    watch.add_argument("job_id", metavar="ID")
    _add_retry_for(watch)
    cancel = _command(jobs, "cancel", _cancel_job, "cancel a job")
    cancel.add_argument("job_id", metavar="ID")
    artifacts = _command(
        jobs,
        "artifacts",
        _list_artifacts,
        "list the files a job wrote (checkpoints, logs, history.csv)",
    )
    artifacts.add_argument("job_id", metavar="ID")
    download = _command(jobs, "download", _download_artifact, "download one of a job's files")
    download.add_argument("job_id", metavar="ID")
    download.add_argument("path", help="as `fitserve jobs artifacts` lists it")
    download.add_argument(
        "-o", "--output", default=".", help="file or folder to write (default: here)"
    )
    listing = _command(jobs, "list", _list_jobs, "list jobs, newest first")
    listing.add_argument("--state", help="e.g. RUNNING, SUCCEEDED, FAILED")
    listing.add_argument("--kind", help="train, evaluate or fine_tune")
    listing.add_argument("--model", default="", help="only jobs of this model")
    listing.add_argument(
        "--full",
        action="store_true",
        help="each job whole, request body (request_json) included, as JSON lines instead "
        "of the table (with --json: one JSON list)",
    )


def _add_model_commands(commands: _Subparsers) -> None:
    models = _group(commands, "models", "inspect and manage the model registry")
    _command(models, "list", _list_models, "list models")
    get = _command(models, "get", _get_model, "show a model's versions and aliases")
    get.add_argument("name")
    versions = _command(models, "versions", _list_versions, "list a model's versions")
    versions.add_argument("name")
    delete_version = _command(
        models,
        "delete-version",
        _delete_version,
        "delete a version (not one an alias points at)",
        _YES,
    )
    delete_version.add_argument("name", metavar="MODEL")
    delete_version.add_argument("version", type=int, metavar="VERSION")
    alias = _group(models, "alias", "point aliases at versions, or remove them")
    alias_set = _command(alias, "set", _set_alias, "point ALIAS at VERSION (e.g. stable)")
    alias_set.add_argument("name", metavar="MODEL")
    alias_set.add_argument("alias", metavar="ALIAS")
    alias_set.add_argument("version", type=int, metavar="VERSION")
    alias_delete = _command(
        alias, "delete", _delete_alias, "remove an alias (its version stays)", _YES
    )
    alias_delete.add_argument("name", metavar="MODEL")
    alias_delete.add_argument("alias", metavar="ALIAS")


def _add_predict_commands(commands: _Subparsers) -> None:
    predict = _command(commands, "predict", _predict, "run a model on the arrays in a file")
    predict.add_argument("model", metavar="MODEL[:VERSION|@ALIAS]")
    predict.add_argument(
        "file",
        metavar="FILE.npy",
        help=".npy (the only input) or .npz (inputs by name, or one array: the only input)",
    )
    selector = predict.add_mutually_exclusive_group()
    selector.add_argument("--version", type=int, help="exact version (default: stable/latest)")
    selector.add_argument("--alias", help='alias such as "canary"')
    predict.add_argument("--output", "-o", help="save the outputs to this .npy/.npz file")

    feedback = _command(
        commands,
        "feedback",
        _feedback,
        "report the true labels of an earlier prediction (live accuracy per version)",
    )
    feedback.add_argument(
        "request_id", metavar="REQUEST_ID", help="as `fitserve predict` printed it"
    )
    feedback.add_argument(
        "labels",
        metavar="LABELS",
        help="a .npy file, an .npz file (its y array, or its only one), or inline JSON "
        "such as '[3, 1, 4]'",
    )
    feedback.add_argument(
        "--output", default="", help="the output the labels are for (several outputs)"
    )


def _add_plugins_command(commands: _Subparsers) -> None:
    plugins = _command(
        commands,
        "plugins",
        _list_plugins,
        "list the server-side plugins (losses, metrics, layers, callbacks)",
    )
    plugins.add_argument("--kind", help="only loss, metric, layer or callback plugins")


# -- training commands ---------------------------------------------------------------


def _train(client: Client, args: argparse.Namespace) -> int:
    spec_path = Path(args.spec)
    spec = _with_command_line(_cli_specs.load_spec(spec_path), args)
    arguments = _cli_specs.train_arguments(spec, spec_path.parent, str(spec_path))
    job = client.train(**_uploaded(client, arguments, args))
    return _follow(job, args)


def _with_command_line(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The spec with what the command line gives instead: --model-name, --epochs,
    --dataset (a relative .npz path read from here, not from the spec's folder) and
    --dataset-name."""
    spec = dict(spec)
    if args.model_name:
        spec["model_name"] = args.model_name
    if args.epochs is not None:
        spec["epochs"] = args.epochs
    if args.dataset:
        spec.pop("dataset_name", None)
        local = args.dataset.lower().endswith(".npz") and "://" not in args.dataset
        spec["dataset"] = str(Path(args.dataset).absolute()) if local else args.dataset
    if args.dataset_name:
        spec["dataset_name"] = args.dataset_name
    return spec


def _fine_tune(client: Client, args: argparse.Namespace) -> int:
    name, version, alias = _cli_specs.parse_model_ref(args.model)
    spec: dict[str, Any] = {}
    where, base_dir = "fine-tune", Path.cwd()
    if args.spec:
        spec = _cli_specs.load_spec(args.spec)
        where, base_dir = args.spec, Path(args.spec).parent
    options = {
        "train_last_n_layers": args.train_last_n_layers,
        "new_head": args.new_head,
        "freeze_layers": _layer_list(args.freeze_layers),
        "loss": args.loss,
        "optimizer": args.optimizer,
        "metrics": _split(args.metrics),
        "batch_size": args.batch_size,
    }
    spec.update({key: value for key, value in options.items() if value is not None})
    spec = _with_command_line(spec, args)
    if spec.get("dataset") is None:
        raise SpecError("fine-tune needs a dataset: --dataset, or dataset in --spec")
    arguments = _cli_specs.fine_tune_arguments(spec, base_dir, where)
    job = client.fine_tune(name, version=version, alias=alias, **_uploaded(client, arguments, args))
    return _follow(job, args)


def _evaluate(client: Client, args: argparse.Namespace) -> int:
    name, version, alias = _cli_specs.parse_model_ref(args.model)
    dataset = _cli_specs.resolve_dataset(args.dataset, Path.cwd(), args.dataset_name)
    arguments = _uploaded(client, {"dataset": dataset}, args)
    job = client.evaluate(
        name,
        version=version,
        alias=alias,
        batch_size=args.batch_size,
        queue=args.queue,
        time_limit_seconds=args.time_limit,
        **arguments,
    )
    return _follow(job, args)


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _layer_list(text: str | None) -> list[str | int] | None:
    parts = _split(text)
    if parts is None:
        return None
    return [int(part) if part.lstrip("-").isdigit() else part for part in parts]


def _uploaded(
    client: Client, arguments: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The arguments with every LocalDataset uploaded first and named by its id."""
    result = dict(arguments)
    for key, value in arguments.items():
        if isinstance(value, LocalDataset):
            if not args.json:
                print(f"uploading {value.path} as dataset {value.name!r}", file=sys.stderr)
            result[key] = client.upload_dataset_file(value.name, value.path).id
    return result


def _follow(job: Job, args: argparse.Namespace) -> int:
    """Wait for `job` with the SDK's progress bar, then print its result; --detach
    returns at once; Ctrl-C asks whether to cancel the job or only stop watching."""
    kind = _enum_name(training_pb2.JobKind, job.info.kind).lower()
    if args.detach:
        if args.json:
            _print_document(_job_document(job.info))
        else:
            print(job.id)
            print(
                f"{kind} job {job.id} {job.state.value}; follow it: fitserve jobs watch {job.id}",
                file=sys.stderr,
            )
        return EXIT_OK
    if not args.json:
        print(f"{kind} job {job.id} of model {job.info.model_name} submitted", flush=True)
    try:
        info = _wait(job, args, 0 if args.json else args.verbose)
    except KeyboardInterrupt:
        return _interrupted(job, args)
    if args.json:
        _print_document(_job_document(info))
    else:
        print(_job_outcome(info))
    return EXIT_OK


def _wait(job: Job, args: argparse.Namespace, verbose: int) -> training_pb2.Job:
    """`job.wait(verbose=...)`; with --json a job that failed or was cancelled is printed
    too (then its error raised), so a script gets the record whatever the outcome."""
    try:
        return job.wait(verbose=0 if verbose == 0 else 2 if verbose == 2 else 1)
    except (JobFailedError, JobCancelledError) as error:
        if args.json:
            _print_document(_job_document(error.job))
        raise


def _job_outcome(info: training_pb2.Job) -> str:
    text = f"job {info.id} {JobState.of(info.state).value}"
    if info.model_version:
        text += f": {info.model_name} version {info.model_version}"
    if info.metrics:
        text += f"\n  {_logs(info.metrics)}"
    return text


def _interrupted(job: Job, args: argparse.Namespace) -> int:
    """Ctrl-C while following: on a terminal, ask whether to cancel the job or only stop
    watching; without one, stop watching and say how to come back."""
    sys.stdout.flush()
    answer = "w"
    if _interactive():
        print(file=sys.stderr)
        answer = _ask("cancel the job, or just stop watching? [c/w] ", ("c", "w"), "w")
    if answer == "w":
        print(
            f"\nstopped watching job {job.id}; it goes on running. Resume: fitserve jobs watch "
            f"{job.id}; cancel it: fitserve jobs cancel {job.id}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    try:
        job.cancel()
        print(f"cancelling job {job.id} ...", file=sys.stderr, flush=True)
    except FailedPreconditionError:
        pass  # it ended meanwhile: its outcome follows
    try:
        info = _wait(job, args, 0)  # JobCancelledError once it stopped: EXIT_JOB_FAILED
    except KeyboardInterrupt:
        print(f"\nstopped watching job {job.id} while it stops", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        _print_document(_job_document(info))
    else:
        print(_job_outcome(info))
    return EXIT_OK


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _ask(question: str, answers: Sequence[str], default: str, *, enter: str = "") -> str:
    """Ask on stderr until one of `answers` (first letters count) comes; EOF or another
    Ctrl-C is `default`, an empty line `enter` (none: ask again)."""
    while True:
        print(question, end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            return default
        if not line:
            return default
        reply = line.strip().lower()[:1] or enter
        if reply in answers:
            return reply


def _confirmed(args: argparse.Namespace, question: str) -> bool:
    """True with --yes or without a terminal; else what the user answers."""
    if args.yes or not _interactive():
        return True
    if _ask(f"{question} [y/N] ", ("y", "n"), "n", enter="n") == "y":
        return True
    print("nothing done", file=sys.stderr)
    return False


# -- datasets ------------------------------------------------------------------------


def _upload_dataset(client: Client, args: argparse.Namespace) -> int:
    dataset = client.upload_dataset_file(args.name, args.file)
    if args.json:
        _print_document(_document(dataset))
    else:
        print(
            f"dataset {dataset.name} uploaded: {dataset.id}, {dataset.num_examples} examples, "
            f"{dataset.size_bytes} bytes"
        )
    return EXIT_OK


def _list_datasets(client: Client, args: argparse.Namespace) -> int:
    datasets = list(client.list_datasets())
    if args.json:
        _print_document([_document(d) for d in datasets])
        return EXIT_OK
    rows = (
        (d.name, d.id, str(d.num_examples), str(d.size_bytes), _time(d.created_at))
        for d in datasets
    )
    _print_table(("NAME", "ID", "EXAMPLES", "BYTES", "CREATED"), rows)
    return EXIT_OK


def _get_dataset(client: Client, args: argparse.Namespace) -> int:
    dataset = client.get_dataset(args.name)
    if args.json:
        _print_document(_document(dataset))
    else:
        _print_fields(_document(dataset))
    return EXIT_OK


def _delete_dataset(client: Client, args: argparse.Namespace) -> int:
    if not _confirmed(args, f"delete dataset {args.name}?"):
        return EXIT_JOB_FAILED
    client.delete_dataset(args.name)
    _print_done(args, {"deleted": {"dataset": args.name}}, f"dataset {args.name} deleted")
    return EXIT_OK


# -- jobs ----------------------------------------------------------------------------


def _get_job(client: Client, args: argparse.Namespace) -> int:
    info = client.get_job(args.job_id).info
    if args.json:
        _print_document(_job_document(info))
        return EXIT_OK
    document = _job_document(info)
    for key in ("history", "request_json"):
        document.pop(key, None)
    if info.metrics:
        document["metrics"] = _logs(info.metrics)
    if info.history:
        document["epochs"] = len(info.history)
    _print_fields(document)
    return EXIT_OK


def _list_jobs(client: Client, args: argparse.Namespace) -> int:
    view = "full" if args.full else "basic"
    jobs = client.list_jobs(state=args.state, model_name=args.model, kind=args.kind, view=view)
    if args.json:
        _print_document([_job_document(job) for job in jobs])
        return EXIT_OK
    if args.full:
        for job in jobs:
            print(json.dumps(_job_document(job)))
        return EXIT_OK
    _print_table(("ID", "KIND", "STATE", "MODEL", "VERSION", "CREATED"), map(_job_row, jobs))
    return EXIT_OK


def _job_row(job: training_pb2.Job) -> tuple[str, ...]:
    kind = _enum_name(training_pb2.JobKind, job.kind)
    state = JobState.of(job.state).value
    version = str(job.model_version or "")
    return (job.id, kind, state, job.model_name, version, _time(job.created_at))


def _watch_job(client: Client, args: argparse.Namespace) -> int:
    job = client.get_job(args.job_id)
    try:
        for event in job.events():
            if not args.json:
                print(_describe_event(event), flush=True)
        info = _wait(job, args, 0)
    except KeyboardInterrupt:
        print(f"\nstopped watching job {job.id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        _print_document(_job_document(info))
    else:
        print(f"job {info.id} SUCCEEDED{_version_suffix(info.model_version)}")
    return EXIT_OK


def _list_artifacts(client: Client, args: argparse.Namespace) -> int:
    artifacts = client.list_artifacts(args.job_id)
    if args.json:
        _print_document([_document(a) for a in artifacts])
        return EXIT_OK
    rows = ((a.path, str(a.size_bytes), _time(a.modified_at)) for a in artifacts)
    _print_table(("PATH", "BYTES", "MODIFIED"), rows)
    return EXIT_OK


def _download_artifact(client: Client, args: argparse.Namespace) -> int:
    written = client.download_artifact(args.job_id, args.path, args.output)
    _print_done(args, {"path": str(written)}, str(written))
    return EXIT_OK


def _cancel_job(client: Client, args: argparse.Namespace) -> int:
    info = client.cancel_job(args.job_id)
    text = f"job {info.id}: {JobState.of(info.state).value}"
    _print_done(args, _job_document(info), text)
    return EXIT_OK


# -- models --------------------------------------------------------------------------


def _list_models(client: Client, args: argparse.Namespace) -> int:
    models = list(client.list_models())
    if args.json:
        _print_document([_document(m) for m in models])
        return EXIT_OK
    rows = (
        (m.name, str(m.latest_version), str(m.version_count), _aliases(m.aliases)) for m in models
    )
    _print_table(("NAME", "LATEST", "VERSIONS", "ALIASES"), rows)
    return EXIT_OK


def _get_model(client: Client, args: argparse.Namespace) -> int:
    model = client.get_model(args.name)
    if args.json:
        _print_document(_document(model))
        return EXIT_OK
    print(f"model {model.name}")
    print(f"aliases: {_aliases(model.aliases) or '(none)'}")
    print()
    _print_versions(model)
    return EXIT_OK


def _list_versions(client: Client, args: argparse.Namespace) -> int:
    model = client.get_model(args.name)
    if args.json:
        _print_document([_document(v) for v in model.versions])
    else:
        _print_versions(model)
    return EXIT_OK


def _print_versions(model: Any) -> None:
    rows = (
        (
            str(v.version),
            _time(v.created_at),
            ",".join(sorted(v.aliases)),
            f"{v.parent_model}:{v.parent_version}" if v.parent_model else "",
            v.job_id,
            _logs(v.metrics),
        )
        for v in model.versions
    )
    _print_table(("VERSION", "CREATED", "ALIASES", "PARENT", "JOB", "METRICS"), rows)


def _set_alias(client: Client, args: argparse.Namespace) -> int:
    response = client.set_alias(args.name, args.alias, args.version)
    before = (
        f" (was version {response.previous_version})" if response.previous_version else " (new)"
    )
    text = f"{response.model_name}@{response.alias} -> version {response.version}{before}"
    _print_done(args, _document(response), text)
    return EXIT_OK


def _delete_alias(client: Client, args: argparse.Namespace) -> int:
    if not _confirmed(args, f"remove alias {args.alias} of model {args.name}?"):
        return EXIT_JOB_FAILED
    client.delete_alias(args.name, args.alias)
    document = {"deleted": {"model_name": args.name, "alias": args.alias}}
    _print_done(args, document, f"alias {args.name}@{args.alias} removed")
    return EXIT_OK


def _delete_version(client: Client, args: argparse.Namespace) -> int:
    if not _confirmed(args, f"delete version {args.version} of model {args.name}?"):
        return EXIT_JOB_FAILED
    client.delete_version(args.name, args.version)
    document = {"deleted": {"model_name": args.name, "version": args.version}}
    _print_done(args, document, f"{args.name} version {args.version} deleted")
    return EXIT_OK


# -- predictions ---------------------------------------------------------------------


def _predict(client: Client, args: argparse.Namespace) -> int:
    name, version, alias = _cli_specs.parse_model_ref(args.model)
    if (version is not None or alias is not None) and (args.version or args.alias):
        raise ValueError(
            "give the version or alias once: MODEL:VERSION, MODEL@ALIAS or --version/--alias"
        )
    x, inputs = _load_inputs(args.file)
    prediction = client.predict_full(
        name,
        x,
        inputs=inputs,
        version=args.version if version is None else version,
        alias=args.alias if alias is None else alias,
    )
    if args.output:
        _save_outputs(args.output, prediction.outputs)
    if args.json:
        document: dict[str, Any] = {
            "model_name": prediction.model_name,
            "version": prediction.version,
            "request_id": prediction.request_id,
        }
        if args.output:
            document["saved"] = args.output
        else:
            document["outputs"] = {k: v.tolist() for k, v in prediction.outputs.items()}
        _print_document(document)
        return EXIT_OK
    if not args.output:
        _print_outputs(prediction.outputs)
    print(
        f"{prediction.model_name} version {prediction.version}, request id "
        f"{prediction.request_id} (fitserve feedback {prediction.request_id} LABELS)",
        file=sys.stderr,
    )
    return EXIT_OK


def _feedback(client: Client, args: argparse.Namespace) -> int:
    labels = _load_labels(args.labels)
    response = client.feedback(args.request_id, labels, output=args.output)
    text = (
        f"feedback on {response.model_name} version {response.version}"
        f"{' output ' + response.output if response.output else ''}: {response.rows} rows, "
        f"{response.correct} correct"
    )
    _print_done(args, _document(response), text)
    return EXIT_OK


def _load_labels(value: str) -> npt.NDArray[Any]:
    """Labels from a .npy file, an .npz file (its `y`, or its only array), or JSON."""
    if value.lower().endswith((".npy", ".npz")):
        loaded = np.load(value, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            if "y" in loaded.files:
                return np.asarray(loaded["y"])
            if len(loaded.files) == 1:
                return np.asarray(loaded[loaded.files[0]])
            raise ValueError(
                f"{value} holds {', '.join(loaded.files)}: which are the labels? Save them "
                "as y, or alone"
            )
    try:
        return np.asarray(json.loads(value))
    except ValueError:
        raise ValueError(
            f"labels {value!r}: neither a .npy/.npz file nor JSON such as '[3, 1, 4]'"
        ) from None


def _list_plugins(client: Client, args: argparse.Namespace) -> int:
    response = client.list_plugins(args.kind)
    if args.json:
        _print_document(_document(response))
    else:
        _print_plugins(response)
    return EXIT_OK


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


def _document(message: Message) -> dict[str, Any]:
    """A message as JSON-ready values: every field (defaults too, so scripts find each
    key), field names as in the .proto, 64-bit integers as numbers, and enums by their
    short name (a job's state as the JobState value, "RUNNING", never a number)."""
    document = json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    _short_enums(document, message.DESCRIPTOR)
    return document


def _short_enums(document: dict[str, Any], message_type: Any) -> None:
    """Enum values in `document` without their type's prefix: JOB_STATE_RUNNING ->
    RUNNING, JOB_KIND_TRAIN -> TRAIN; nested fitserve messages likewise."""
    for name, value in document.items():
        field = message_type.fields_by_name.get(name)
        if field is None:
            continue
        if field.enum_type is not None:
            prefix = _enum_prefix(field.enum_type)
            if isinstance(value, list):
                document[name] = [str(item).removeprefix(prefix) for item in value]
            else:
                document[name] = str(value).removeprefix(prefix)
            continue
        nested = field.message_type
        if nested is None or not nested.full_name.startswith("fitserve."):
            continue
        if nested.GetOptions().map_entry:
            value_type = nested.fields_by_name["value"].message_type
            if value_type is not None and value_type.full_name.startswith("fitserve."):
                for item in value.values():
                    _short_enums(item, value_type)
        elif isinstance(value, list):
            for item in value:
                _short_enums(item, nested)
        elif isinstance(value, dict):
            _short_enums(value, nested)


def _enum_prefix(enum_type: descriptor.EnumDescriptor) -> str:
    snake = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum_type.name)
    return snake.lstrip("_") + "_"


def _job_document(info: training_pb2.Job) -> dict[str, Any]:
    document = _document(info)
    document["state"] = JobState.of(info.state).value
    return document


def _print_document(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=False))


def _print_done(args: argparse.Namespace, document: Any, text: str) -> None:
    if args.json:
        _print_document(document)
    else:
        print(text)


def _print_fields(document: Mapping[str, Any]) -> None:
    """A record as `key  value` lines, empty values left out, nested values as JSON."""
    rows = [
        (key, value if isinstance(value, str) else json.dumps(value))
        for key, value in document.items()
        if value not in ("", 0, [], {}, None) or key == "state"
    ]
    _print_table(None, rows)


def _print_table(header: Sequence[str] | None, rows: Iterable[Sequence[str]]) -> None:
    for line in format_table(header, rows):
        print(line)


def format_table(header: Sequence[str] | None, rows: Iterable[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart, the last one unpadded;
    a header row first when given (printed even when there are no rows)."""
    lines = [*([list(header)] if header is not None else []), *(list(row) for row in rows)]
    if not lines:
        return []
    columns = len(lines[0])
    widths = [max(len(line[column]) for line in lines) for column in range(columns)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


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
    text = f"state {JobState.of(change.state).value}"
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


if __name__ == "__main__":
    sys.exit(main())
