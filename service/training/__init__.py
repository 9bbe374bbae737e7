"""Worker-only, with TensorFlow: build and compile models, data pipelines, callbacks, fit,
export, fine-tune and evaluate. Run by the Celery worker; no grpc or generated code here."""
