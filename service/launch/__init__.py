"""Starting and supervising processes: servers, workers, Redis and the embedded stack.

``supervision`` (spawn, supervise, terminate), ``ready`` (the --ready-file handshake),
``redis_server`` (the embedded Redis), ``serving`` (``serve``, ``serve --processes N``,
``start_server``), ``workers`` (Celery command line, one worker per GPU) and ``stack``
(``Stack``: Redis + server + worker; ``fitserve up``).
"""
