"""Safe names for Lance tables and partition files.

Lance table names may hold only ``[A-Za-z0-9_.-]``; partition keys and stage names
may hold anything. A name that had to change gets a short hash of the original
appended, so two different originals never map to the same safe name.

>>> safe_name("stage-1")
'stage-1'
>>> safe_name("a/b")
'a_b-3ec69c85a4'
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_NAME = 120


def safe_name(name: str, max_len: int = MAX_NAME) -> str:
    """Return ``name`` if it is already safe, else a cleaned name with a hash of the original."""
    cleaned = _UNSAFE.sub("_", name)
    if cleaned == name and name and len(name) <= max_len and not name.startswith("."):
        return name
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned[: max_len - len(digest) - 1]}-{digest}"


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://...``, ``gs://...``), false for local paths."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (``file://`` stripped)."""
    return uri[len("file://") :] if uri.startswith("file://") else uri
