"""L6 tools: the ``sage-prefect`` command."""
