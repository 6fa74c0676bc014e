"""Atomic writes (a result file appears whole or not at all, never half-written) and the user cache's folder."""

import json
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Builds, downloads and the demo model's files: $SPINQUANT_CACHE, else ~/.cache/spinquant. Here, not in
    spinquant.models: the kernel loader needs it in a runner's process, where transformers' model code would
    add tens of MiB of RSS (results/memory.md's libraries column)."""
    return Path(os.environ.get("SPINQUANT_CACHE", Path.home() / ".cache" / "spinquant"))


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and programs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())
