"""TensorFlow-free: request and job types, the stores (jobs, models, datasets) and their rules.

Shared by every role, the api role above all, so nothing here imports TensorFlow, Keras,
grpc, Celery or generated code (import contracts in pyproject.toml).
"""
