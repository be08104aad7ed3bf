"""The gateway's endpoints, one module each, over `common.Gateway`.

``embeddings`` serves ``/v1/embeddings``; ``chat`` and ``completions`` turn their requests into
a `GenerationRequest` that ``generation`` runs and answers (whole or as server-sent events).
Parsing, rendering and tokenising run off the event loop once a body is larger than
`common.INLINE_BYTES`, so a huge request never holds up ``/health`` or anyone else's tokens.
"""
