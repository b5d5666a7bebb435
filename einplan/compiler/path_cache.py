"""An on-disk cache of opt-einsum contraction paths, keyed by equation, sizes and versions."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import opt_einsum

from einplan._version import __version__


def cache_dir() -> Path:
    """einplan's cache folder: ``$EINPLAN_CACHE_DIR``, else ``einplan`` under
    ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    root = os.environ.get("EINPLAN_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "einplan")
    return Path(root)


def default_cache_path() -> Path:
    """``paths.json`` in :func:`cache_dir`."""
    return cache_dir() / "paths.json"


def cache_key(spec: str, sizes: list[tuple[int, ...]]) -> str:
    """The key of one contraction: equation, concrete operand shapes and both versions."""
    shapes = ";".join(",".join(map(str, s)) for s in sizes)
    return f"{spec}|{shapes}|opt_einsum {opt_einsum.__version__}|einplan {__version__}"


class PathCache:
    """Contraction paths remembered across compilations; written back atomically."""

    def __init__(self, path: Path | None, enabled: bool = True) -> None:
        self.path = path or default_cache_path()
        self.enabled = enabled
        self.entries: dict[str, list[list[int]]] = {}
        self.dirty = False
        self.hits = self.misses = 0
        if enabled and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.entries = data if isinstance(data, dict) else {}
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a broken cache is only a cache: rebuild it

    def find_path(self, spec: str, sizes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Return the pairwise contraction order for ``spec`` over operands of ``sizes``."""
        key = cache_key(spec, sizes)
        if key in self.entries:
            self.hits += 1
            return [tuple(p) for p in self.entries[key]]
        self.misses += 1
        path, _ = opt_einsum.contract_path(spec, *sizes, shapes=True, optimize="optimal")
        self.entries[key] = [list(p) for p in path]
        self.dirty = True
        return [tuple(p) for p in path]

    def save(self) -> None:
        """Write new entries to disk (temp file + rename, so readers never see half a file)."""
        if not (self.enabled and self.dirty):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f)
        os.replace(tmp, self.path)
        self.dirty = False
