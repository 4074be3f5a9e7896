"""The admin socket: install, roll back and list models on a running agent.

A second Unix socket, separate from the one the test equipment talks to, and mode 0600 by
default (the agent's own user only): whoever can reach it can change the model that screens
dies. The protocol is one JSON object per line each way:

    -> {"op": "install", "bundle": "/abs/path/model.efb", "force": false}
    <- {"ok": true, "result": {"op": "install", "outcome": "committed", "id": "...", ...}}
    -> {"op": "rollback", "to": null}
    -> {"op": "models", "check": false}
    -> {"op": "status"}
    -> {"op": "check"}                 # run the integrity check now
    <- {"ok": false, "error": {"kind": "InstallFailed", "message": "...", "state": "verify",
                               "cause": "Downgrade", "hint": null}}

The bundle is named by path and read by the agent process, so it must be readable by the
agent's user (copy it into `<store>/staging/` first when it is not). One request at a time per
connection; jobs are serialized by the installer (a second install while one runs is refused
with `InstallBusy`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import EdgefleetError

if TYPE_CHECKING:  # the client side never loads the installer (nor ONNX Runtime)
    from agent.install import Installer

log = logging.getLogger("edgefleet.agent")

DEFAULT_ADMIN_SOCKET = Path("/run/edgefleet/admin.sock")
ADMIN_SOCKET_ENV = "EDGEFLEET_ADMIN_SOCKET"
MAX_REQUEST = 64 * 1024
OPS = ("install", "rollback", "models", "status", "check")

__all__ = ["AdminClient", "AdminError", "AdminServer", "AdminUnreachable", "default_socket"]


class AdminError(EdgefleetError):
    """The agent refused or failed an admin request; `kind` is the agent-side error class
    (e.g. "InstallFailed"), `cause` the underlying one (e.g. "Downgrade")."""

    def __init__(self, kind: str, message: str, *, cause: str | None = None,
                 state: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind, self.cause, self.state = kind, cause, state


class AdminUnreachable(EdgefleetError):
    """No agent answers on the admin socket."""


def default_socket() -> Path:
    return Path(os.environ.get(ADMIN_SOCKET_ENV) or DEFAULT_ADMIN_SOCKET)


class AdminServer:
    """Serve `installer` on a Unix socket (mode `mode`, optionally group `gid`)."""

    def __init__(self, path: Path, installer: Installer, *, mode: int = 0o600,
                 gid: int = -1) -> None:
        self.path = Path(path)
        self.installer = installer
        self.mode, self.gid = mode, gid
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AdminServer:
        """Bind under a temporary name, set mode and group, rename into place: the socket never
        exists under its real name with looser permissions. A stale socket is replaced."""
        from agent.server import remove_stale_socket  # the serving side only, not the client

        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_socket(path, "--admin-socket")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            if self.gid >= 0:
                os.chown(tmp, -1, self.gid)
            sock.listen(8)
            os.rename(tmp, path)
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise EdgefleetError(f"cannot listen on admin socket {path}: {e.strerror}") from None
        self._sock, self._inode = sock, os.lstat(path).st_ino
        self._thread = threading.Thread(target=self._accept, name="admin-accept", daemon=True)
        self._thread.start()
        log.info("admin socket on %s (mode %04o)", path, self.mode)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()

    def __enter__(self) -> AdminServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="admin-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            for line in iter(lambda: reader.readline(MAX_REQUEST + 1), b""):
                if len(line) > MAX_REQUEST:
                    conn.sendall(_error_line("UsageError", "request too long"))
                    return
                if line.strip():
                    conn.sendall(self.handle(line))

    def handle(self, line: bytes) -> bytes:
        """One request line in, one answer line out; never raises."""
        from agent.install import InstallFailed

        try:
            req = json.loads(line)
        except ValueError as e:
            return _error_line("UsageError", f"not JSON: {e}")
        if not isinstance(req, dict) or req.get("op") not in OPS:
            return _error_line("UsageError", f"op must be one of {', '.join(OPS)}")
        try:
            result = self._do(req)
        except InstallFailed as e:  # rolled back: say where and why
            return _error_line("InstallFailed", str(e), cause=e.kind, state=e.state)
        except EdgefleetError as e:
            return _error_line(type(e).__name__, e.message, hint=e.hint)
        except Exception as e:  # a bug: answer, log, keep serving
            log.exception("admin request failed")
            return _error_line("InternalError", f"{type(e).__name__}: {e}")
        return json.dumps({"ok": True, "result": result}).encode() + b"\n"

    def _do(self, req: dict[str, Any]) -> Any:
        inst, op = self.installer, req["op"]
        if op == "install":
            bundle = req.get("bundle")
            if not isinstance(bundle, str) or not os.path.isabs(bundle):
                raise EdgefleetError("install: 'bundle' must be an absolute path")
            log.info("admin: install %s%s", bundle, " (forced)" if req.get("force") else "")
            return inst.install(Path(bundle), force=bool(req.get("force"))).to_json()
        if op == "rollback":
            log.info("admin: rollback to %s", req.get("to") or "previous")
            return inst.rollback(req.get("to")).to_json()
        if op == "models":
            versions = inst.store.list_versions(check=bool(req.get("check")))
            return {**inst.status(), "versions": [v.to_json() for v in versions]}
        if op == "check":
            return inst.check_integrity().to_json()
        return inst.status()


def _error_line(kind: str, message: str, **extra: Any) -> bytes:
    return json.dumps({"ok": False, "error": {"kind": kind, "message": message, **extra}}
                      ).encode() + b"\n"


class AdminClient:
    """Blocking client: one request at a time. Methods return the agent's `result` object and
    raise `AdminError` (with the agent's message) or `AdminUnreachable`."""

    def __init__(self, path: Path | None = None, timeout: float = 300.0) -> None:
        self.path = Path(path) if path else default_socket()
        self.timeout = timeout

    def install(self, bundle: Path, *, force: bool = False) -> dict[str, Any]:
        return self.request({"op": "install", "bundle": str(Path(bundle).resolve()),
                             "force": force})

    def rollback(self, to: str | None = None) -> dict[str, Any]:
        return self.request({"op": "rollback", "to": to})

    def models(self, *, check: bool = False) -> dict[str, Any]:
        return self.request({"op": "models", "check": check})

    def status(self) -> dict[str, Any]:
        return self.request({"op": "status"})

    def check(self) -> dict[str, Any]:
        return self.request({"op": "check"})

    def request(self, obj: dict[str, Any]) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as e:
            sock.close()
            raise AdminUnreachable(
                f"cannot connect to the agent's admin socket {self.path}: {e.strerror}",
                hint=f"is the agent running? (set --admin-socket or {ADMIN_SOCKET_ENV})",
            ) from None
        try:
            with sock, sock.makefile("rb") as reader:
                sock.sendall(json.dumps(obj).encode() + b"\n")
                line = reader.readline()
        except OSError as e:
            raise AdminUnreachable(f"admin socket {self.path}: {e}") from None
        if not line:
            raise AdminUnreachable(f"the agent closed the admin connection on {self.path}")
        answer = json.loads(line)
        if not answer.get("ok"):
            err = answer.get("error", {})
            raise AdminError(err.get("kind", "Error"), err.get("message", "failed"),
                             cause=err.get("cause"), state=err.get("state"),
                             hint=err.get("hint"))
        return answer["result"]
