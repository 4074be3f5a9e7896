"""The agent's Unix-socket server: one thread per connection, blocking sockets, one process.

Why threads and not asyncio: a request is ~15 us of ONNX Runtime (which releases the GIL) and a
few microseconds of Python, and an event loop's own overhead per message is of the same order.
A thread per connection (a handful of test heads per box) keeps the hot path to one `recv_into`
and one `sendall`, and a slow or broken client only ever blocks its own thread.

Fairness: no client, however it behaves, keeps another from getting answers.
- A connection idle between messages for `idle_timeout_s` is closed (0: never).
- A message must arrive whole within `message_timeout_s` of its first bytes (a client that
  trickles a byte at a time is closed when it runs out, however often bytes come).
- An answer the client does not take within `io_timeout_s` closes the connection.
- At most `max_connections` connections, and at most `max_connections_per_peer` from one
  process (the peer's pid, from SO_PEERCRED). When every slot is taken, a new connection
  evicts the connection idle the longest, if it has been idle `EVICT_IDLE_S` or more; only
  when none has is the newcomer refused with `busy`. So held-open connections (a leaky test
  program, a crashed handler that never closed) can never lock a tester out.
- `busy` comes in the client's own framing: the agent waits up to `BUSY_PEEK_S` for the first
  bytes; a 0x89 gets an ERROR frame (with the request's tag once its header arrived), anything
  else, or nothing, a JSON line.
- An oversized line or frame, or an unparseable frame header, gets an error answer and the
  connection is closed (the stream cannot be resynchronized); every other error is answered
  and the connection stays open.
Every close is counted by reason (`CloseReason`, `edgefleet_connections_closed_total`).

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
from collections import Counter
from enum import StrEnum
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
_mono = time.monotonic
_INITIAL_BUFFER = 1 << 16
_MAX_UNIX_PATH = 107
HEADER_UNPACK = HEADER.unpack_from
_UCRED = struct.Struct("3i")  # pid, uid, gid (SO_PEERCRED)
EVICT_IDLE_S = 1.0
"""A connection idle at least this long may be closed to make room for a new one."""
BUSY_PEEK_S = 0.1
"""How long a refused connection's first bytes are waited for, to answer `busy` in its framing."""
_MAX_REFUSING = 8  # refusals waiting for first bytes at once; beyond, busy goes out as JSON
_DRAIN_BYTES = 1 << 20


class CloseReason(StrEnum):
    """Why a connection ended (the `reason` label of edgefleet_connections_closed_total)."""

    CLIENT = "client"  # the client closed between messages
    INCOMPLETE = "incomplete"  # the client hung up mid-message
    IDLE_TIMEOUT = "idle_timeout"  # no message for idle_timeout_s
    MESSAGE_TIMEOUT = "message_timeout"  # a message not whole within message_timeout_s
    SEND_TIMEOUT = "send_timeout"  # an answer not taken within io_timeout_s
    EVICTED = "evicted"  # the longest idle, closed to make room for a new connection
    BUSY = "busy"  # refused on connect: no slot free, or the peer's limit reached
    TOO_LARGE = "too_large"  # a line or frame over the limit (answered, then closed)
    BAD_FRAME = "bad_frame"  # an untrustworthy frame header (answered, then closed)
    RESET = "reset"  # the socket failed: reset by the peer, broken pipe
    SHUTDOWN = "shutdown"  # the agent stopped
    INTERNAL = "internal"  # a bug in the connection loop (logged)


class ServerError(EdgefleetError):
    """The server cannot start: socket path in use, not a socket, too long, bad group."""


class _Closed(Exception):
    """The connection ends, for `reason`."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason)
        self.reason = reason


def _timeval(seconds: float) -> bytes:
    """SO_RCVTIMEO/SO_SNDTIMEO value; 0 means no timeout, so a positive time never rounds to
    it."""
    if seconds <= 0:
        return struct.pack("ll", 0, 0)
    us = max(int(seconds * 1e6), 1)
    return struct.pack("ll", us // 1_000_000, us % 1_000_000)


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
        self._conns: dict[socket.socket, _Connection] = {}
        self._per_peer: Counter[int] = Counter()
        self._conns_lock = threading.Lock()
        self._refusing = threading.BoundedSemaphore(_MAX_REFUSING)
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self.trimmer = Trimmer()
        self._send_timeout = _timeval(config.io_timeout_s)
        self._idle_timeout = _timeval(config.idle_timeout_s)
        self._closed = {r: self.metrics.connections_closed.labels(r) for r in CloseReason}

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
            log.info("metrics on %s/metrics (probes /healthz, /readyz)", self.http.url)
        self.trimmer.start()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="agent-accept",
                                               daemon=True)
        self._accept_thread.start()
        log.info("agent listening on %s (mode %04o)", self.path, self.config.socket_mode)

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
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        """Serve `conn` in its own thread, evicting the longest-idle connection when every slot
        is taken, or refuse it with `busy`."""
        pid = _peer_pid(conn)
        cfg = self.config
        refusal = victim = None
        with self._conns_lock:
            if self._per_peer[pid] >= cfg.max_connections_per_peer:
                refusal = (f"too many connections from this process (pid {pid}): at most "
                           f"{cfg.max_connections_per_peer}; close some and try again")
            elif len(self._conns) >= cfg.max_connections:
                victim = self._longest_idle()
                if victim is None:
                    refusal = (f"too many connections ({cfg.max_connections}), none idle; "
                               "try again later")
                else:
                    self._forget(victim)
                    victim.evicted = True
            if refusal is None:
                c = _Connection(self, conn, pid)
                self._conns[conn] = c
                self._per_peer[pid] += 1
        if victim is not None:
            log.info("closing the connection idle longest (pid %d) for a new one", victim.pid)
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)
        if refusal is not None:
            self._refuse(conn, refusal)
            return
        self.metrics.connections_total.inc()
        self.metrics.connections_active.inc()
        threading.Thread(target=self._serve, args=(c,), name="agent-conn", daemon=True).start()

    def _longest_idle(self) -> _Connection | None:
        """The connection waiting for its next message the longest, if EVICT_IDLE_S or more."""
        oldest, since = None, _mono() - EVICT_IDLE_S
        for c in self._conns.values():
            t = c.idle_since
            if t is not None and t <= since:
                oldest, since = c, t
        return oldest

    def _forget(self, c: _Connection) -> None:
        """Free `c`'s slot (under the lock); idempotent."""
        if self._conns.pop(c.sock, None) is not None:
            self._per_peer[c.pid] -= 1
            if not self._per_peer[c.pid]:
                del self._per_peer[c.pid]

    def _refuse(self, conn: socket.socket, message: str) -> None:
        """Answer `busy` and close; in the client's framing when its first bytes come within
        BUSY_PEEK_S (on a short-lived thread, so accepting goes on)."""
        self.metrics.record_error(ErrorCode.BUSY)
        self._closed[CloseReason.BUSY].inc()
        err = ProtocolError(ErrorCode.BUSY, message)
        if not self._refusing.acquire(blocking=False):  # a flood of refusals: no waiting
            _send_and_close(conn, encode_json(error_json(err)))
            return

        def answer() -> None:
            try:
                _send_and_close(conn, _busy_answer(conn, err))
            finally:
                self._refusing.release()

        threading.Thread(target=answer, name="agent-busy", daemon=True).start()

    def _serve(self, c: _Connection) -> None:
        reason = CloseReason.INTERNAL
        conn = c.sock
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._send_timeout)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._idle_timeout)
            c.run()
        except _Closed as e:
            reason = e.reason
        except (BlockingIOError, TimeoutError):  # sendall: the client does not read answers
            reason = CloseReason.SEND_TIMEOUT
        except OSError as e:  # the client hung up, or we shut the socket down
            log.debug("connection closed: %s", e)
            reason = CloseReason.RESET
        except Exception:
            log.exception("connection handler failed")
        finally:
            with self._conns_lock:
                self._forget(c)
            if c.evicted:
                reason = CloseReason.EVICTED
            elif self._stopping.is_set():
                reason = CloseReason.SHUTDOWN
            self._closed[reason].inc()
            self.metrics.connections_active.dec()
            conn.close()


def _peer_pid(conn: socket.socket) -> int:
    """The connecting process's pid (SO_PEERCRED); 0 where the platform does not say."""
    try:
        return _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                             _UCRED.size))[0]
    except (OSError, AttributeError):
        return 0


def _busy_answer(conn: socket.socket, err: ProtocolError) -> bytes:
    """`busy` as an ERROR frame when the client's first byte is 0x89 (tag echoed when its whole
    header came within BUSY_PEEK_S), else as a JSON line."""
    data = b""
    deadline = _mono() + BUSY_PEEK_S
    with contextlib.suppress(OSError):
        while True:
            conn.settimeout(max(deadline - _mono(), 0.001))
            chunk = conn.recv(HEADER_SIZE - len(data))
            data += chunk
            if not chunk or data[0] != MAGIC_BYTE or len(data) == HEADER_SIZE:
                break
    if not data or data[0] != MAGIC_BYTE:
        return encode_json(error_json(err))
    tag = HEADER.unpack(data)[4] if len(data) == HEADER_SIZE else 0
    return encode_error_frame(err, tag)


def _send_and_close(conn: socket.socket, answer: bytes) -> None:
    _send_last(conn, answer)
    conn.close()


def _send_last(conn: socket.socket, answer: bytes) -> None:
    """Send a closing answer, then read and drop what the client still sends, for up to
    BUSY_PEEK_S and 1 MiB: a Unix socket closed with unread data makes the client's next read
    fail with ECONNRESET, before it has read the answer that says why."""
    deadline = _mono() + BUSY_PEEK_S
    with contextlib.suppress(OSError):
        conn.settimeout(BUSY_PEEK_S)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)
        dropped = 0
        while dropped < _DRAIN_BYTES and (left := deadline - _mono()) > 0:
            conn.settimeout(left)
            chunk = conn.recv(65536)
            if not chunk:
                break
            dropped += len(chunk)


class _Connection:
    """The read loop of one client: find the next complete message in the buffer, answer it.

    `buf[start:end]` holds received bytes not yet answered. A message that is already complete
    costs one `recv_into` and one `sendall`; only a partial one waits for more, against the
    message's deadline. `idle_since` is set while waiting for the next message (the server
    picks the connection to evict by it).
    """

    def __init__(self, server: AgentServer, sock: socket.socket, pid: int) -> None:
        self.server = server
        self.sock = sock
        self.pid = pid
        self.idle_since: float | None = None
        self.evicted = False
        self.dispatch = server.dispatch
        self.metrics = server.metrics
        self.max_line = server.config.max_line_bytes
        self.max_frame = server.config.max_frame_bytes
        self.message_timeout = server.config.message_timeout_s
        self.buf = bytearray(_INITIAL_BUFFER)
        self.start = self.end = 0
        self._deadline: float | None = None  # of the message being read, once it is partial
        self._timed = False  # SO_RCVTIMEO holds a message's deadline, not the idle timeout
        self.trimmer = server.trimmer
        self.tap = server.tap

    def run(self) -> None:
        sock, dispatch = self.sock, self.dispatch
        while True:
            if self.start == self.end:  # idle: wait up to idle_timeout_s for the next message
                self.start = self.end = 0
                if self._timed:  # back from a message's deadline to the idle timeout
                    self._timed = False
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                    self.server._idle_timeout)
                    if len(self.buf) > _INITIAL_BUFFER:  # after a big frame: give memory back
                        self.buf = bytearray(_INITIAL_BUFFER)
                self.idle_since = _mono()
                try:
                    n = sock.recv_into(self.buf)
                except (BlockingIOError, TimeoutError):
                    raise _Closed(CloseReason.IDLE_TIMEOUT) from None
                self.idle_since = None
                if not n:
                    raise _Closed(CloseReason.CLIENT)
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
                        self._fatal(encode_error_frame(e, h[4]), e.code,
                                    CloseReason.BAD_FRAME)
                total = HEADER_SIZE + h[7]
                if total > self.max_frame:
                    self._fatal(encode_error_frame(ProtocolError(
                        ErrorCode.TOO_LARGE, f"frame: {total} bytes, at most {self.max_frame} "
                        "allowed (send smaller batches)"), h[4]), ErrorCode.TOO_LARGE,
                        CloseReason.TOO_LARGE)
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
            if self._deadline is not None:
                self._deadline = None  # the next message gets its own
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
            "(send smaller batches, or binary frames)"))), ErrorCode.TOO_LARGE,
            CloseReason.TOO_LARGE)
        raise AssertionError  # unreachable

    def _need(self, size: int) -> None:
        """Make sure `size` bytes from `start` are in the buffer."""
        while self.end - self.start < size:
            self._read_more(size)

    def _read_more(self, want: int) -> None:
        """Receive more of a message in progress (at least `want` bytes buffered in total is the
        goal); gives up when the message is not whole `message_timeout_s` after this first
        wait for it."""
        if len(self.buf) - self.start < want:  # make room: compact, or grow
            if want <= len(self.buf):
                pending = self.end - self.start
                self.buf[:pending] = self.buf[self.start:self.end]
                self.start, self.end = 0, pending
            else:
                new = bytearray(max(want, 2 * len(self.buf)))
                new[:self.end - self.start] = self.buf[self.start:self.end]
                self.buf, self.start, self.end = new, 0, self.end - self.start
        now = _mono()
        if self._deadline is None:
            self._deadline = now + self.message_timeout
        left = self._deadline - now
        if left <= 0:
            self._incomplete(CloseReason.MESSAGE_TIMEOUT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(left))
        self._timed = True
        try:
            n = self.sock.recv_into(memoryview(self.buf)[self.end:])
        except (BlockingIOError, TimeoutError):
            self._incomplete(CloseReason.MESSAGE_TIMEOUT)
        if not n:
            self._incomplete(CloseReason.INCOMPLETE)  # hung up mid-message
        self.end += n

    def _incomplete(self, reason: CloseReason) -> None:
        self.metrics.record_error(ErrorCode.INCOMPLETE)
        raise _Closed(reason)

    def _fatal(self, answer: bytes, code: ErrorCode, reason: CloseReason) -> None:
        """Answer, then close: the stream cannot be trusted to continue."""
        self.metrics.record_error(code)
        _send_last(self.sock, answer)
        raise _Closed(reason)


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
