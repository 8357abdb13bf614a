"""Lab commands: change a label of the reference server while it runs.

``tpmid est-server label NAME --dir DIR --lifetime 10m --pending 2 --retry-after 3s
--fault status=503 --clear-faults`` changes one label's certificate lifetime,
pending answers and fault knobs without anyone editing ``config.yaml``:

1. the change is merged into ``DIR/lab.yaml`` (per-label overrides on top of
   ``config.yaml``) and the result is parsed exactly as the server will parse it,
   so a bad value is refused here, with the key named, before anything is written;
2. ``lab.yaml`` is written (durably, 0600);
3. if a server runs for ``DIR``, it is sent SIGHUP and the command waits until the
   server reports that it reloaded (``DIR/run.json``), or why it could not.

Why a validated state file plus SIGHUP and not a control socket: the server keeps
one way to change its configuration (reload, which never accepts a broken file),
a change survives a restart and can be made before the server starts, and nothing
new listens. Pending and fault ``times`` counters start afresh at every reload.

A running ``tpmid est-server run`` holds ``flock(2)`` on ``DIR/run.lock`` (which
names its pid) and keeps ``DIR/run.json`` (pid, URL, reloads done, the last
reload's error). A lab command signals a pid only while that lock is held by it,
so a stale ``run.json`` after a crash is never trusted and no unrelated process
that inherited the pid is signalled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tpmid.config import read_yaml_file, shown
from tpmid.errors import ConfigError, StoreError
from tpmid.server.config import (
    Faults,
    LabelConfig,
    LabOverrides,
    ServerConfig,
    merge_lab,
    parse_lab,
    parse_server_config,
)
from tpmid.server.state import ServerPaths
from tpmid.store.fsio import atomic_write
from tpmid.store.locks import acquire_lock, lock_is_held, release_lock

RELOAD_TIMEOUT = 15.0
LAB_LOCK = "lab.lock"
_LAB_HEADER = ("# Lab overrides per label, on top of config.yaml; written by "
               "`tpmid est-server label` (docs/est-server.md).\n")
_FAULT_HINT = "see tpmid est-server label --help and docs/est-server.md"
_TRUE = ("", "true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


# --------------------------------------------------------------------------- changes


@dataclass(frozen=True)
class LabChange:
    """What ``tpmid est-server label`` asks for; ``None``/empty leaves a setting alone.

    ``faults`` are added to the label's current faults (after ``clear_faults``, to
    none); ``reset`` first drops every lab override of the label.
    """

    lifetime: str | None = None
    pending: int | None = None
    retry_after: str | None = None
    faults: Mapping[str, Any] = field(default_factory=dict)
    clear_faults: bool = False
    reset: bool = False

    @property
    def changes_anything(self) -> bool:
        """False for a command that only shows the label."""
        return (self.lifetime is not None or self.pending is not None
                or self.retry_after is not None or bool(self.faults) or self.clear_faults
                or self.reset)


def _fault_kinds() -> dict[str, str]:
    """Fault knob -> how its ``--fault`` value is read, from :class:`Faults` itself."""
    kinds = {}
    for f in dataclasses.fields(Faults):
        t = str(f.type)
        kinds[f.name] = ("flag" if t == "bool" else "list" if t.startswith("tuple")
                         else "int" if t.startswith("int") else "str" if t.startswith("str")
                         else "duration")
    return kinds


FAULT_KINDS = _fault_kinds()


def parse_fault(text: str) -> tuple[str, Any]:
    """``status=503``, ``delay=2s``, ``drop``, ``operations=simpleenroll,simplereenroll``.

    Returns the knob and its value as ``config.yaml`` spells it; the value itself
    is checked with the whole label (:func:`update_label`).
    """
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    kind = FAULT_KINDS.get(key)
    if kind is None:
        raise ConfigError(f"--fault {shown(text)}: unknown fault {shown(key)}",
                          hint=f"known faults: {', '.join(sorted(FAULT_KINDS))} "
                          "(docs/est-server.md)")
    value = value.strip()
    if kind == "flag":
        if value.lower() in _TRUE:
            return key, True
        if value.lower() in _FALSE:
            return key, False
        raise ConfigError(f"--fault {shown(text)}: {key} is on or off",
                          hint=f"write --fault {key} to switch it on, --fault {key}=false to "
                          "switch it off")
    if not sep or not value:
        example = {"int": "503", "duration": "2s", "str": "'CN=x'", "list": "simpleenroll"}[kind]
        raise ConfigError(f"--fault {shown(text)}: {key} needs a value, e.g. {key}={example}",
                          hint=_FAULT_HINT)
    if kind == "int":
        try:
            return key, int(value)
        except ValueError:
            raise ConfigError(f"--fault {shown(text)}: {key} takes a whole number",
                              hint=_FAULT_HINT) from None
    if kind == "list":
        return key, [v.strip() for v in value.split(",") if v.strip()]
    return key, value


def apply_change(config_doc: Any, lab: LabOverrides, label: str, change: LabChange,
                 source: str) -> LabOverrides:
    """The lab overrides after ``change`` to ``label`` (pure; nothing is checked but the label)."""
    labels = config_doc.get("labels") if isinstance(config_doc, dict) else None
    if not isinstance(labels, dict) or label not in labels:
        known = ", ".join(sorted(map(str, labels))) if isinstance(labels, dict) else "none"
        raise ConfigError(f"the server has no label {shown(label)} (labels: {known})",
                          hint="labels are defined in the server's config.yaml")
    out = {name: dict(v) for name, v in lab.items() if name != label}
    entry = {} if change.reset else dict(lab.get(label, {}))
    for key in ("lifetime", "pending", "retry_after"):
        if getattr(change, key) is not None:
            entry[key] = getattr(change, key)
    if change.clear_faults or change.faults:
        current = merge_lab(config_doc, {label: entry} if entry else {}, source)
        base = {} if change.clear_faults else dict(current["labels"][label].get("faults") or {})
        entry["faults"] = {**base, **change.faults}
    if entry:
        out[label] = entry
    return out


# --------------------------------------------------------------------------- the running server


@dataclass(frozen=True)
class RunInfo:
    """What ``DIR/run.json`` says about the running server."""

    pid: int
    url: str
    reloads: int = 0
    error: str | None = None  # why the last reload was refused (None: it succeeded)


def read_run_file(paths: ServerPaths) -> RunInfo | None:
    """``DIR/run.json`` (None if absent or unreadable: a server between two writes)."""
    try:
        data = json.loads(paths.run_file.read_text())
        return RunInfo(pid=int(data["pid"]), url=str(data["url"]), reloads=int(data["reloads"]),
                       error=data.get("error"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _lock_pid(paths: ServerPaths) -> int | None:
    try:
        text = paths.run_lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running_server(paths: ServerPaths, *, wait: float = 5.0) -> RunInfo | None:
    """The server running for this directory, or None.

    A server holds ``run.lock`` from before it reads its config until it exits, and
    writes ``run.json`` once it listens; in between, this waits up to ``wait`` s.
    """
    deadline = time.monotonic() + wait
    while lock_is_held(paths.run_lock):
        info = read_run_file(paths)
        if info is not None and info.pid == _lock_pid(paths):
            return info
        if time.monotonic() > deadline:
            raise ConfigError(f"a server for {paths.dir} holds {paths.run_lock.name} but has not "
                              "said where it listens", hint="is it still starting? try again")
        time.sleep(0.02)
    return None


def reload_running(paths: ServerPaths, timeout: float = RELOAD_TIMEOUT) -> RunInfo | None:
    """SIGHUP the running server and wait until it reloaded; None if no server runs."""
    info = running_server(paths)
    if info is None:
        return None
    os.kill(info.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        now = read_run_file(paths)
        if now is not None and now.pid == info.pid and now.reloads > info.reloads:
            if now.error:
                raise ConfigError(f"the running server (pid {info.pid}) kept its previous "
                                  f"settings: {now.error}",
                                  hint="fix config.yaml or lab.yaml and run the command again")
            return now
        if not lock_is_held(paths.run_lock):
            raise ConfigError(f"the server (pid {info.pid}) stopped before it confirmed the "
                              "change", hint="the change is saved and applies at its next start")
        if time.monotonic() > deadline:
            raise ConfigError(f"the running server (pid {info.pid}) did not confirm the change "
                              f"within {timeout:g} s", hint="see its log; the change is saved "
                              "in lab.yaml and applies at its next reload or start")
        time.sleep(0.02)


class ServerRun:
    """The running server's side: hold ``run.lock``, keep ``run.json`` up to date."""

    def __init__(self, paths: ServerPaths) -> None:
        self.paths = paths
        self._fd: int | None = None
        self._url = ""
        self._reloads = 0

    def claim(self) -> ServerRun:
        """Take ``run.lock``; refuse if another server runs for this directory."""
        _require_server_dir(self.paths)
        self._fd = acquire_lock(
            self.paths.run_lock, wait=False, timeout=None,
            busy=lambda holder: f"another EST server runs for {self.paths.dir} ({holder})",
            hint="stop it first, or use another --dir")
        return self

    def listening(self, url: str) -> None:
        """The server accepts connections at ``url``: lab commands may signal it now."""
        self._url = url
        self._write(None)

    def reloaded(self, error: str | None) -> None:
        """One reload done (``error``: why it was refused and the old config kept)."""
        self._reloads += 1
        self._write(error)

    def _write(self, error: str | None) -> None:
        data = {"pid": os.getpid(), "url": self._url, "reloads": self._reloads, "error": error}
        atomic_write(self.paths.run_file, (json.dumps(data) + "\n").encode(), 0o644,
                     durable=False)

    def close(self) -> None:
        """The server has stopped."""
        if self._fd is None:
            return
        self.paths.run_file.unlink(missing_ok=True)
        release_lock(self._fd)
        self._fd = None

    def __enter__(self) -> ServerRun:
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class LabResult:
    """A label after ``tpmid est-server label``."""

    label: LabelConfig
    overrides: Mapping[str, Any]  # this label's entry in lab.yaml ({} if none)
    lab_file: Path
    changed: bool
    server: RunInfo | None  # the running server that applied it (None: none runs)


def _require_server_dir(paths: ServerPaths) -> None:
    if not paths.config.is_file():
        what = "does not exist" if not paths.dir.exists() else "holds no EST server (no config.yaml)"
        raise ConfigError(f"EST server directory {paths.dir} {what}",
                          hint=f"create one with: tpmid est-server init --dir {paths.dir}")


def _read_lab(paths: ServerPaths) -> LabOverrides:
    if not paths.lab.exists():
        return {}
    return parse_lab(read_yaml_file(paths.lab, "lab overrides file", ""), str(paths.lab))


def _parse(config_doc: Any, lab: LabOverrides, paths: ServerPaths) -> ServerConfig:
    source = f"{paths.config} (with {paths.lab.name})" if lab else str(paths.config)
    return parse_server_config(merge_lab(config_doc, lab, str(paths.lab)), source)


T = TypeVar("T")


@contextlib.contextmanager
def _lab_turn(paths: ServerPaths, timeout: float) -> Iterator[None]:
    """Hold ``DIR/lab.lock``: lab commands for one directory take turns."""
    try:
        fd = acquire_lock(paths.dir / LAB_LOCK, wait=True, timeout=timeout,
                          busy=lambda holder: f"another lab command is changing {paths.dir} "
                          f"({holder})", hint="try again when it is done")
    except StoreError as e:
        raise ConfigError(e.message, hint=e.hint) from e
    try:
        yield
    finally:
        release_lock(fd)


def change_and_reload(dir: Path, change: Callable[[ServerPaths], T], *,
                      timeout: float = RELOAD_TIMEOUT) -> tuple[T, RunInfo | None]:
    """Run ``change`` on the server directory in turn with lab commands, then apply it.

    ``DIR/lab.lock`` is held across the change and the reload (as by
    :func:`update_label`); a running server is sent SIGHUP and confirms. Returns what
    ``change`` returned and the running server (None if none runs).
    """
    paths = ServerPaths(dir.resolve())
    _require_server_dir(paths)
    with _lab_turn(paths, timeout):
        result = change(paths)
        return result, reload_running(paths, timeout)


def update_label(dir: Path, label: str, change: LabChange, *,
                 timeout: float = RELOAD_TIMEOUT) -> LabResult:
    """Apply ``change`` to ``label`` of the server in ``dir`` (see the module docstring).

    With an empty change it only reports the label's settings. Lab commands for one
    directory take turns (``DIR/lab.lock``), each waiting for its own reload.
    """
    paths = ServerPaths(dir.resolve())
    _require_server_dir(paths)
    with _lab_turn(paths, timeout):
        config_doc = read_yaml_file(paths.config, "server config", "")
        lab = _read_lab(paths)
        new_lab = apply_change(config_doc, lab, label, change, str(paths.lab))
        try:
            config = _parse(config_doc, new_lab, paths)
        except ConfigError as e:
            if not change.changes_anything:
                raise
            raise ConfigError(f"label {label} not changed: {e.message}",
                              hint=e.hint or "see docs/est-server.md for the values") from e
        server: RunInfo | None
        if change.changes_anything:
            body = yaml.safe_dump({"labels": new_lab}, sort_keys=True) if new_lab else "labels: {}\n"
            atomic_write(paths.lab, (_LAB_HEADER + body).encode(), 0o600)
            server = reload_running(paths, timeout)
        else:
            server = running_server(paths)
    found = config.label(label)
    assert found is not None  # apply_change checked the name
    return LabResult(label=found, overrides=new_lab.get(label, {}), lab_file=paths.lab,
                     changed=change.changes_anything, server=server)


def label_summary(label: LabelConfig) -> dict[str, Any]:
    """The settings a lab command changes, for people and ``--json``."""
    defaults = Faults()
    faults = {f.name: getattr(label.faults, f.name) for f in dataclasses.fields(Faults)
              if getattr(label.faults, f.name) != getattr(defaults, f.name)}
    if "operations" in faults:
        faults["operations"] = list(faults["operations"])
    return {"label": label.name, "ca": label.ca, "profile": label.profile,
            "lifetime_s": label.lifetime, "pending": label.pending,
            "retry_after_s": label.retry_after, "faults": faults}
