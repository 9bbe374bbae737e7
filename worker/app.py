"""The Celery app of the worker: ``celery -A worker.app worker -Q train,cpu -c 1``.

TensorFlow is never imported here: the prefork parent stays light, and each child imports
it when the first task runs (see ``worker.runtime``).
"""

from __future__ import annotations

from service.config import Settings
from service.taskqueue import create_celery

settings = Settings()
app = create_celery(settings, "fitserve-worker")
app.conf.update(include=["worker.tasks"])
