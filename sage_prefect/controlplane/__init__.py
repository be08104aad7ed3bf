"""L4 control plane: an OpenAI-compatible gateway that schedules LLM and embedding traffic together.

Import the pieces from their modules (`scheduler`, `engines.*`, `app`, `server`); this package
imports nothing heavy on its own.
"""
