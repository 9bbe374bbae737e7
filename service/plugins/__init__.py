"""Server-side plugins: custom losses, metrics, layers and callbacks that operators
install as Python packages on servers and workers (no client code ever runs here).

- ``registry``: what each plugin is and the checks a request's use of one must pass
  (TF-free; the api role checks requests with it).
- ``discovery``: finds plugins through entry points and ``FITSERVE_PLUGINS``.

Workers also register the objects with Keras (``service.training.plugins``) so that
model configs and ``model.keras`` files that name them deserialize.
"""
