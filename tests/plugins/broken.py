"""A plugin module that fails to import: the server must report it and keep serving."""

raise ImportError("broken plugin: a dependency it needs is not installed")
