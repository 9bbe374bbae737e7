"""Starting and supervising processes: servers, workers, Redis and the embedded stack."""
