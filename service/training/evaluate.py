"""Runs an evaluation job: a stored version's model.keras on a dataset (worker side)."""

from __future__ import annotations

import logging
from typing import Any

import keras

from service.domain.evaluation_results import record_evaluation
from service.domain.job_specs import CompileSpec, EvaluateSpec
from service.domain.jobs import Job
from service.domain.model_store import KERAS_FILE
from service.domain.workspace import Workspace
from service.training import building, data
from service.training.callbacks import plain_logs, time_limit

log = logging.getLogger(__name__)


def run_evaluate(job: Job, spec: EvaluateSpec, ws: Workspace) -> None:
    """Evaluate the pinned version, keep the result with the version and the job."""
    compile_spec = CompileSpec.model_validate(
        ws.models.metadata(spec.model_name, spec.version)["compile"]
    )
    model = load_model(ws, spec, compile_spec)
    ranks = {t.name: len(t.shape) for t in model.inputs}
    eval_data = data.load(ws, spec.dataset, spec.batch_size, input_ranks=ranks)
    data.check(model, compile_spec, eval_data)
    limit = time_limit(spec.run.time_limit_seconds, job.started_at)
    callbacks = [limit] if limit is not None else []
    if eval_data.streamed:  # batched by tf.data
        with data.read_errors(eval_data):
            results = model.evaluate(eval_data.x, return_dict=True, verbose=0, callbacks=callbacks)
    else:
        results = model.evaluate(
            eval_data.x,
            eval_data.y,
            sample_weight=eval_data.sample_weight,
            batch_size=spec.batch_size,
            return_dict=True,
            verbose=0,
            callbacks=callbacks,
        )
    if limit is not None:
        limit.check()  # a partial evaluation is not recorded
    metrics = plain_logs(results)
    dataset = spec.dataset.label
    record_evaluation(ws.models, spec.model_name, spec.version, dataset, metrics, job.id)
    ws.jobs.succeed(job.id, metrics, spec.version)


def load_model(ws: Workspace, spec: EvaluateSpec, compile_spec: CompileSpec) -> Any:
    """The stored full model, compiled as it was trained (recompiled from fitserve.json
    when the file carries no compile config)."""
    path = ws.models.path(spec.model_name, spec.version) / KERAS_FILE
    model = keras.models.load_model(path, compile=True, safe_mode=True)
    if not model.compiled:
        building.compile_model(model, compile_spec)
    return model
