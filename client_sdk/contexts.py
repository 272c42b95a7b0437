"""Where the ``tessera`` CLI finds connection settings: named contexts and the dev broker record.

Contexts (like ``nats context``) live in ``$XDG_CONFIG_HOME/tessera/contexts.json`` (default
``~/.config``), one JSON document ``{"current": NAME, "contexts": {NAME: {...}}}`` holding a URL
and the paths of a CA, a certificate and a key (never a key's content or a password).

A running ``tessera-broker serve --dev`` writes ``dev-broker.json`` in ``$XDG_RUNTIME_DIR/tessera``
(or ``$XDG_STATE_HOME/tessera``, default ``~/.local/state``) with its directory, URL and process
id, so ``tessera ... --dev`` finds it from any directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONTEXT_FIELDS",
    "Context",
    "ContextError",
    "ContextStore",
    "DevRecord",
    "config_dir",
    "dev_record_path",
    "read_dev_record",
    "remove_dev_record",
    "write_dev_record",
]

CONTEXT_FIELDS = ("url", "ca", "cert", "key", "server_name", "description")


class ContextError(Exception):
    """A context that does not exist, a bad name, or a store that cannot be read."""


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/tessera`` (default ``~/.config/tessera``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tessera"


def _state_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "tessera"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tessera"


@dataclass(frozen=True)
class Context:
    """Saved connection settings; paths are absolute."""

    url: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    description: str | None = None


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ContextStore:
    """The contexts file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "contexts.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"current": None, "contexts": {}}
        except (OSError, ValueError) as exc:
            raise ContextError(f"cannot read {self.path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("contexts"), dict):
            raise ContextError(f"{self.path} is not a contexts file")
        return data

    def names(self) -> list[str]:
        return sorted(self._load()["contexts"])

    @property
    def current(self) -> str | None:
        current = self._load().get("current")
        return current if isinstance(current, str) else None

    def get(self, name: str) -> Context:
        raw = self._load()["contexts"].get(name)
        if not isinstance(raw, dict):
            raise ContextError(f"no context named {name!r} (see `tessera context list`)")
        return Context(**{k: raw.get(k) for k in CONTEXT_FIELDS})

    def add(self, name: str, context: Context) -> None:
        if not name or "/" in name or name.startswith(".") or len(name) > 64:
            raise ContextError(f"bad context name {name!r}")
        data = self._load()
        data["contexts"][name] = {k: v for k, v in asdict(context).items() if v is not None}
        if data.get("current") is None:
            data["current"] = name
        _atomic_write(self.path, data)

    def use(self, name: str) -> None:
        data = self._load()
        if name not in data["contexts"]:
            raise ContextError(f"no context named {name!r} (see `tessera context list`)")
        data["current"] = name
        _atomic_write(self.path, data)

    def remove(self, name: str) -> None:
        data = self._load()
        if name not in data["contexts"]:
            raise ContextError(f"no context named {name!r} (see `tessera context list`)")
        del data["contexts"][name]
        if data.get("current") == name:
            data["current"] = None
        _atomic_write(self.path, data)


@dataclass(frozen=True)
class DevRecord:
    """What a running dev broker tells clients: its directory, URL and process id."""

    dir: str
    url: str
    pid: int


def dev_record_path() -> Path:
    return _state_dir() / "dev-broker.json"


def write_dev_record(record: DevRecord) -> Path:
    path = dev_record_path()
    _atomic_write(path, asdict(record))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_dev_record() -> DevRecord | None:
    """The running dev broker's record, or None (no file, or its process is gone)."""
    try:
        raw = json.loads(dev_record_path().read_text(encoding="utf-8"))
        record = DevRecord(dir=str(raw["dir"]), url=str(raw["url"]), pid=int(raw["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if _alive(record.pid) else None


def remove_dev_record(pid: int) -> None:
    """Remove the record if it is this process's (another dev broker may have replaced it)."""
    path = dev_record_path()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if int(json.loads(path.read_text(encoding="utf-8"))["pid"]) == pid:
            path.unlink()
