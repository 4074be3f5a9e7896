"""The agent's Unix-socket server: one thread per connection, blocking sockets, one process.

Why threads and not asyncio: a request is ~15 us of ONNX Runtime (which releases the GIL) and a
few microseconds of Python, and an event loop's own overhead per message is of the same order.
A thread per connection (a handful of test heads per box) keeps the hot path to one `recv_into`
and one `sendall`, and a slow or broken client only ever blocks its own thread:

- a message that stops halfway, or an answer the client does not read, times out after
  `io_timeout_s` (socket-level SO_RCVTIMEO/SO_SNDTIMEO) and that connection is closed;
- an oversized line or frame, or an unparseable frame header, gets an error answer and the
  connection is closed (the stream cannot be resynchronized); every other error is answered
  and the connection stays open;
- beyond `max_connections`, new connections get a `busy` error line and are closed.

Start-up handles a stale socket file (left by a crash): it is removed when nothing answers on
it; a live agent on the same path, or a path that is not a socket, is refused. The socket is
bound under a temporary name, given its mode and group, then renamed into place, so it never
exists under its real name with the wrong permissions.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

from agent.config import AgentConfig
from agent.dispatch import Dispatcher
from agent.errors import EdgefleetError
from agent.labels import answer_label_frame
from agent.memory import Trimmer
from agent.metrics import AgentMetrics, MetricsServer
from agent.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAGIC_BYTE,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameType,
    ProtocolError,
    encode_error_frame,
    encode_json,
    error_json,
    parse_header,
)
from agent.runtime import Runtime

log = logging.getLogger("edgefleet.agent")
_perf = time.perf_counter
_INITIAL_BUFFER = 1 << 16
_MAX_UNIX_PATH = 107
HEADER_UNPACK = HEADER.unpack_from


class ServerError(EdgefleetError):
    """The server cannot start: socket path in use, not a socket, too long, bad group."""


class _Closed(Exception):
    """The connection ended (cleanly, by timeout, or because we closed it)."""


class AgentServer:
    """Serve a `Runtime` on a Unix socket (and its metrics over HTTP, when configured)."""

    def __init__(self, config: AgentConfig, runtime: Runtime,
                 metrics: AgentMetrics | None = None) -> None:
        if config.socket is None:
            raise ServerError("no socket path configured", hint="pass --socket PATH")
        self.config = config
        self.path = Path(config.socket)
        self.runtime = runtime
        self.metrics = metrics or AgentMetrics(runtime)
        self.dispatch = Dispatcher(runtime, self.metrics)
        # agent.predlog.PredictionLog.tap when the log runs: (buf, start, end, answer) after
        # each answer is sent
        self.tap = None
        self.http: MetricsServer | None = None
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self.trimmer = Trimmer()
        self._timeout = struct.pack("ll", int(config.io_timeout_s),
                                    int((config.io_timeout_s % 1) * 1e6))
        self._no_timeout = struct.pack("ll", 0, 0)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind the socket (and the metrics port) and start accepting; returns at once."""
        addr = self.config.metrics_host_port()
        if addr is not None:
            try:
                self.http = MetricsServer(self.metrics, *addr)
            except OSError as e:
                raise ServerError(f"cannot serve metrics on {self.config.metrics_addr}: "
                                  f"{e.strerror}", hint="choose another --metrics-addr") from None
        try:
            self._listener = self._bind()
        except BaseException:
            if self.http is not None:
                self.http.httpd.server_close()
            raise
        if self.http is not None:
            self.http.start()
            log.warning("metrics on %s/metrics (probes /healthz, /readyz)", self.http.url)
        self.trimmer.start()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="agent-accept",
                                               daemon=True)
        self._accept_thread.start()
        log.warning("agent listening on %s (mode %04o)", self.path, self.config.socket_mode)

    def stop(self) -> None:
        """Stop accepting, close every connection, remove the socket file if it is ours."""
        self._stopping.set()
        self.trimmer.stop()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with contextlib.suppress(OSError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        if self.http is not None:
            self.http.stop()

    def __enter__(self) -> AgentServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ socket file

    def _bind(self) -> socket.socket:
        path = self.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if len(os.fsencode(tmp)) > _MAX_UNIX_PATH:
            raise ServerError(f"socket path {path} is too long for a Unix socket "
                              f"({_MAX_UNIX_PATH - 12} bytes at most)")
        remove_stale_socket(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        gid = -1
        if self.config.socket_group:
            try:
                gid = grp.getgrnam(self.config.socket_group).gr_gid
            except KeyError:
                raise ServerError(f"socket group {self.config.socket_group!r} does not exist",
                                  hint="create it or pass another --socket-group") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sock.bind(os.fsencode(tmp))
            os.chmod(tmp, self.config.socket_mode)
            if gid >= 0:
                os.chown(tmp, -1, gid)
            sock.listen(128)
            os.rename(tmp, path)
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ServerError(f"cannot listen on {path}: {e.strerror}") from None
        self._inode = os.lstat(path).st_ino
        return sock

    # ------------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # EMFILE and the like: back off, keep serving the others
                continue
            with self._conns_lock:
                busy = len(self._conns) >= self.config.max_connections
                if not busy:
                    self._conns.add(conn)
            if busy:
                self._refuse(conn)
                continue
            self.metrics.connections_total.inc()
            self.metrics.connections_active.inc()
            threading.Thread(target=self._serve, args=(conn,), name="agent-conn",
                             daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        self.metrics.record_error(ErrorCode.BUSY)
        err = ProtocolError(ErrorCode.BUSY, f"too many connections "
                            f"({self.config.max_connections}); try again later")
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 100_000))
            conn.sendall(encode_json(error_json(err)))
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeout)
            _Connection(self, conn).run()
        except _Closed:
            pass
        except OSError as e:  # the client hung up, or stopped reading its answers
            log.debug("connection closed: %s", e)
        except Exception:
            log.exception("connection handler failed")
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            self.metrics.connections_active.dec()
            conn.close()


class _Connection:
    """The read loop of one client: find the next complete message in the buffer, answer it.

    `buf[start:end]` holds received bytes not yet answered. A message that is already complete
    costs one `recv_into` and one `sendall`; only a partial one waits (with a timeout) for more.
    """

    def __init__(self, server: AgentServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.dispatch = server.dispatch
        self.metrics = server.metrics
        self.max_line = server.config.max_line_bytes
        self.max_frame = server.config.max_frame_bytes
        self.buf = bytearray(_INITIAL_BUFFER)
        self.start = self.end = 0
        self._timed = False
        self.trimmer = server.trimmer
        self.tap = server.tap

    def run(self) -> None:
        sock, dispatch = self.sock, self.dispatch
        while True:
            if self.start == self.end:  # idle: wait as long as it takes for the next message
                self.start = self.end = 0
                if self._timed:
                    self._set_read_timeout(False)
                    if len(self.buf) > _INITIAL_BUFFER:  # after a big frame: give memory back
                        self.buf = bytearray(_INITIAL_BUFFER)
                n = sock.recv_into(self.buf)
                if not n:
                    return
                self.end = n
            if self.buf[self.start] == MAGIC_BYTE:
                if self.end - self.start < HEADER_SIZE:
                    self._need(HEADER_SIZE)
                # magic, version, type, flags, tag, rows, columns, length
                h = HEADER_UNPACK(self.buf, self.start)
                if (h[0] != MAGIC or h[1] != PROTOCOL_VERSION or h[2] != FrameType.PREDICT
                        or h[3] or h[7] != h[5] * (8 + 4 * h[6])):
                    try:
                        parse_header(self.buf, self.start)  # names what is wrong
                    except ProtocolError as e:
                        self._fatal(encode_error_frame(e, h[4]), e.code)
                total = HEADER_SIZE + h[7]
                if total > self.max_frame:
                    self._fatal(encode_error_frame(ProtocolError(
                        ErrorCode.TOO_LARGE, f"frame: {total} bytes, at most {self.max_frame} "
                        "allowed (send smaller batches)"), h[4]), ErrorCode.TOO_LARGE)
                if self.end - self.start < total:
                    self._need(total)
                    if total > _INITIAL_BUFFER:
                        self.trimmer.note()
                m0 = self.start
                if h[2] == FrameType.PREDICT:
                    answer = dispatch.frame(self.buf, m0, h[4], h[5], h[6], _perf())
                else:  # a LABEL frame (agent/labels.py)
                    answer = answer_label_frame(dispatch.labels, self.buf, m0, h[4], h[5])
                self.start = m1 = m0 + total
            else:
                idx = self._line_end()
                if idx - self.start > _INITIAL_BUFFER:  # a big batch: trim once they stop
                    self.trimmer.note()
                t0 = _perf()
                stop = idx - 1 if idx > self.start and self.buf[idx - 1] == 13 else idx  # \r\n
                m0, m1 = self.start, stop
                if stop > self.start:
                    answer = dispatch.json_line(memoryview(self.buf)[self.start:stop], t0)
                else:
                    answer = b""  # blank line: ignored
                self.start = idx + 1
            if answer:
                sock.sendall(answer)
                if self.tap is not None:  # the prediction log, after the answer went out
                    self.tap(self.buf, m0, m1, answer)

    def _line_end(self) -> int:
        """Index of the newline ending the line at `start`, reading more as needed."""
        scanned = self.start
        while True:
            idx = self.buf.find(b"\n", scanned, self.end)
            if idx >= 0:
                if idx - self.start > self.max_line:
                    break
                return idx
            scanned = self.end
            if self.end - self.start > self.max_line:
                break
            self._read_more(self.end - self.start + 1)
        self._fatal(encode_json(error_json(ProtocolError(
            ErrorCode.TOO_LARGE, f"line: longer than {self.max_line} bytes "
            "(send smaller batches, or binary frames)"))), ErrorCode.TOO_LARGE)
        raise AssertionError  # unreachable

    def _need(self, size: int) -> None:
        """Make sure `size` bytes from `start` are in the buffer."""
        while self.end - self.start < size:
            self._read_more(size)

    def _read_more(self, want: int) -> None:
        """Receive more of a message in progress (at least `want` bytes buffered in total is the
        goal); gives up after io_timeout_s without data."""
        if len(self.buf) - self.start < want:  # make room: compact, or grow
            if want <= len(self.buf):
                pending = self.end - self.start
                self.buf[:pending] = self.buf[self.start:self.end]
                self.start, self.end = 0, pending
            else:
                new = bytearray(max(want, 2 * len(self.buf)))
                new[:self.end - self.start] = self.buf[self.start:self.end]
                self.buf, self.start, self.end = new, 0, self.end - self.start
        if not self._timed:
            self._set_read_timeout(True)
        try:
            n = self.sock.recv_into(memoryview(self.buf)[self.end:])
        except (BlockingIOError, TimeoutError):
            self.metrics.record_error(ErrorCode.INCOMPLETE)
            raise _Closed from None
        if not n:
            self.metrics.record_error(ErrorCode.INCOMPLETE)  # hung up mid-message
            raise _Closed
        self.end += n

    def _set_read_timeout(self, on: bool) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             self.server._timeout if on else self.server._no_timeout)
        self._timed = on

    def _fatal(self, answer: bytes, code: ErrorCode) -> None:
        """Answer, then close: the stream cannot be trusted to continue."""
        self.metrics.record_error(code)
        with contextlib.suppress(OSError):
            self.sock.sendall(answer)
        raise _Closed


def remove_stale_socket(path: Path, option: str = "--socket") -> None:
    """Remove a socket file nobody listens on (left by a crash); refuse a live one, or a path
    that is not a socket. `option` names the flag to change in the error's hint."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket; refusing to replace it",
                          hint=f"remove it or choose another {option}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fsencode(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.warning("removing stale socket %s (nothing listens on it)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as e:
        raise ServerError(f"cannot check existing socket {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ServerError(f"another process is listening on {path}",
                      hint=f"stop the other agent or choose another {option}")
