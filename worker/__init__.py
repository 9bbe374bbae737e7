"""fitserve Celery worker: task shims that call service.domain."""
