"""Where the embedded demo keeps what it builds (data, base model)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$LATENTDIFF_CACHE`` when set, else ``~/.cache/latentdiff``."""
    root = os.environ.get("LATENTDIFF_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "latentdiff"

