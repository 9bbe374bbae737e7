"""The Celery app of the worker: ``celery -A worker.app worker -Q train,cpu -c 1``.

TensorFlow is never imported in the prefork parent: each child imports it as it starts
(``worker_process_init``), so the parent stays light and a job finds a warm child.
SIGTERM stops the worker within ``worker_stop_grace_seconds``, its job handed back
(``worker.shutdown``). The main process serves /metrics for itself and its children
(``worker.metrics``, on FITSERVE_WORKER_METRICS_PORT), keeps its heartbeat, and marks
each job whose message it receives (``worker.received``), so that the api's reaper sends
the job again should this worker die before a child starts it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init

from service.config import Settings
from service.taskqueue import TaskQueue, create_celery
from worker import shutdown
from worker.metrics import WorkerMetrics
from worker.received import ReceivedMarks
from worker.runtime import Runtime

settings = Settings()  # the worker's composition root: read the environment once, here
app = create_celery(settings, "fitserve-worker")
app.conf.update(include=["worker.tasks"])
runtime = Runtime(settings, resubmit=TaskQueue(app).resubmit)
shutdown.install_parent(settings)
log = logging.getLogger(__name__)


@worker_process_init.connect
def warm_child(**_: Any) -> None:
    """Import TensorFlow and Keras in the new child and set up its devices (which must
    happen before TensorFlow initializes them), before its first job arrives."""
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    from service.training import devices

    devices.configure(settings.worker_cpu_devices)
    plugins = runtime.plugins
    log.info("worker child ready (TensorFlow imported); %d plugin objects", len(plugins.plugins))


WorkerMetrics(settings).install()  # after warm_child: a child counts GPUs once set up
ReceivedMarks(settings).install()  # each job received, marked: the reaper finds it if we die
