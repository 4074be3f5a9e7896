"""The agent's Unix-socket server: one event loop (epoll) serving every connection.

Why one loop and not a thread per connection: the agent's own Python work per request
(framing, dispatch, metrics) is larger than ONNX Runtime's (~15 us a row, GIL released), and with
a thread per connection every request hands the GIL over three or four times (recv, run, send),
so eight test heads got no more answers per second than one and waited milliseconds in the GIL
queue. The loop reads every connection that is ready, then answers all the single-row binary
requests it found in one ONNX Runtime run (`Dispatcher.frames`): a batch of eight costs little
more than one row, and nothing waits on purpose (the batch is what arrived since the last poll).
Everything else (JSON lines, batch frames, labels, errors) is answered as it is read. One
connection ready with one single-row frame is answered directly (`_Connection.answer_one`);
while it is the only connection, its next request is read right after the answer, before
epoll_wait (a tester sends its next die as soon as it has read the answer: most reads succeed).

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
import queue
import select
import socket
import stat
import struct
import threading
import time
from collections import Counter, deque
from enum import StrEnum
from functools import partial
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
# a single-row PREDICT frame: magic, version, type, flags; then tag, rows, columns, length
_ONE_ROW_PREFIX = struct.pack("<4sBBH", MAGIC, PROTOCOL_VERSION, FrameType.PREDICT, 0)
_HEADER_TAIL = struct.Struct("<IIII").unpack_from
_UCRED = struct.Struct("3i")  # pid, uid, gid (SO_PEERCRED)
EVICT_IDLE_S = 1.0
"""A connection idle at least this long may be closed to make room for a new one."""
BUSY_PEEK_S = 0.1
"""How long a refused connection's first bytes are waited for, to answer `busy` in its framing."""
_MAX_REFUSING = 8  # refusals waiting for first bytes at once; beyond, busy goes out as JSON
_DRAIN_BYTES = 1 << 20
_SWEEP_S = 0.05  # timeouts are checked this often (and the loop wakes at least this often)
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_ALONE_TURNS = 16  # answers in a row to a lone connection before the loop polls again
BIG_ROWS = 64
"""Frames of more rows than this, and JSON lines longer than `BIG_LINE` bytes (batches), are
answered on the worker thread, so the loop goes on answering the other connections meanwhile."""
BIG_LINE = 1 << 16


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
        self._conns: dict[int, _Connection] = {}  # by file descriptor
        self._per_peer: Counter[int] = Counter()
        self._conns_lock = threading.Lock()  # the loop writes; tests and tools read
        self._refusing = threading.BoundedSemaphore(_MAX_REFUSING)
        self._stopping = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._epoll: select.epoll | None = None
        self._wake_r = self._wake_w = -1  # a pipe: the worker and stop() wake the loop
        self._accept_paused_until = 0.0
        self._work: queue.SimpleQueue = queue.SimpleQueue()  # big requests, for the worker
        self._done: deque = deque()  # (connection, answer, start, end) from the worker
        self._worker: threading.Thread | None = None
        self.trimmer = Trimmer()
        self._closed = {r: self.metrics.connections_closed.labels(r) for r in CloseReason}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind the socket (and the metrics port) and start serving; returns at once."""
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
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), _IN)
        self._epoll.register(self._wake_r, _IN)
        self._loop_thread = threading.Thread(target=self._loop, name="agent-loop", daemon=True)
        self._loop_thread.start()
        self._worker = threading.Thread(target=self._work_loop, name="agent-batches", daemon=True)
        self._worker.start()
        log.info("agent listening on %s (mode %04o)", self.path, self.config.socket_mode)

    def stop(self) -> None:
        """Stop accepting, close every connection, remove the socket file if it is ours."""
        self._stopping.set()
        self.trimmer.stop()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=5)
        if self._worker is not None:
            self._work.put(None)
            self._worker.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
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

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        """Until stopped: wait for readiness, read what is there, answer every complete message
        (single-row frames of all connections together), close what timed out."""
        again: list[_Connection] = []  # complete messages still buffered: no waiting for them
        next_sweep = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    again, next_sweep = self._turn(again, next_sweep)
                except Exception:  # a bug: logged, and serving goes on
                    log.exception("the agent's connection loop failed")
                    again = []
        finally:
            for c in list(self._conns.values()):
                self._close(c, CloseReason.SHUTDOWN)
            self._epoll.close()  # type: ignore[union-attr]

    def _turn(self, again: list[_Connection], next_sweep: float
              ) -> tuple[list[_Connection], float]:
        """One turn of the loop: (connections to process next turn, time of the next sweep)."""
        ep, conns = self._epoll, self._conns
        assert ep is not None and self._listener is not None
        events = ep.poll(0 if again else _SWEEP_S)
        if len(events) == 1 and not again and not self._done:  # one connection ready: the
            c = conns.get(events[0][0])  # usual case with one test head, answered directly
            if c is not None and c.out is None:
                # the only connection: its next frame is read right after the answer, with no
                # epoll_wait (a tester sends its next die as soon as it has read the answer)
                turns = _ALONE_TURNS if len(conns) == 1 else 1
                while c.receive():
                    if not c.answer_one():
                        c.queued = True
                        self._answer([c], again)
                        if c.queued:  # more complete messages: the next turn answers them
                            break
                    turns -= 1
                    # read on only from a connection with everything answered and sent (not
                    # one whose big request is on the worker, or whose answer waits to go)
                    if not turns or c.idle_since is None or c.out is not None or not c.alive:
                        break
                return again, self._tick(next_sweep)
        ready, again = again, []
        for fd, _ in events:
            c = conns.get(fd)
            if c is None:
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(fd, 4096)
                elif fd == self._listener.fileno():
                    self._accept_all()
                continue
            if c.out is not None:
                if not self._flush(c):
                    continue
            elif not c.receive():
                continue
            if not c.queued:
                c.queued = True
                ready.append(c)
        while self._done:
            self._finish(ready, *self._done.popleft())
        if ready:
            self._answer(ready, again)
        return again, self._tick(next_sweep)

    def _tick(self, next_sweep: float) -> float:
        """Sweep the deadlines when it is time (every `_SWEEP_S`); the time of the next sweep."""
        now = _mono()
        if now < next_sweep:
            return next_sweep
        self._sweep(now)
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._epoll.register(self._listener.fileno(), _IN)  # type: ignore[union-attr]
        return now + _SWEEP_S

    def _answer(self, ready: list[_Connection], again: list[_Connection]) -> None:
        """Answer the complete messages of `ready`: everything but single-row PREDICT frames as
        read; those, one per connection, together after (a connection's later messages wait
        in its buffer, to keep its answers in order)."""
        held: list[_Connection] = []
        for c in ready:
            c.queued = False
            if not c.alive:
                continue
            try:
                c.process(held)
            except Exception:
                log.exception("connection handler failed")
                if c.held is not None:
                    held.remove(c)
                    c.held = None
                self._close(c, CloseReason.INTERNAL)
        if not held:
            return
        if len(held) == 1:  # one test head: no batch to build
            buf, offset, tag, columns, t0 = held[0].held
            answers = [self.dispatch.frame(buf, offset, tag, 1, columns, t0)]
        else:
            answers = self.dispatch.frames([c.held for c in held])
            self.trimmer.note()  # batch-sized buffers: given back once the heads go quiet
        tap = self.tap
        for c, answer in zip(held, answers, strict=True):
            m0, m1 = c.held[1], c.start
            c.held = None
            if not c.send(answer):
                continue
            if tap is not None:
                tap(c.buf, m0, m1, answer)
            if c.start < c.end and c.out is None:
                c.queued = True
                again.append(c)
            else:
                c.settle()

    def hand_off(self, c: _Connection, job: partial, m0: int, m1: int) -> None:
        """Have the worker thread answer `c`'s big request (`job()`, the message being
        `c.buf[m0:m1]`); nothing more is read from `c` until the answer went out."""
        c.idle_since = None  # busy: not evicted, and not read on by the lone-connection path
        self._epoll.unregister(c.fd)  # type: ignore[union-attr]
        self._work.put((c, job, m0, m1))

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            c, job, m0, m1 = item
            self._done.append((c, job(), m0, m1))  # dispatch answers errors, never raises
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def _finish(self, ready: list[_Connection], c: _Connection, answer: bytes, m0: int,
                m1: int) -> None:
        """Send the worker's answer to `c` and read from `c` again."""
        if not c.alive:  # closed meanwhile (the agent stops)
            return
        self._epoll.register(c.fd, _IN)  # type: ignore[union-attr]
        if not c.send(answer):
            return
        if self.tap is not None:
            self.tap(c.buf, m0, m1, answer)
        if not c.queued:
            c.queued = True
            ready.append(c)

    def _flush(self, c: _Connection) -> bool:
        """Send more of `c`'s pending answer; True once all of it went (read again)."""
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return False
        except OSError:
            self._close(c, CloseReason.RESET)
            return False
        if n < len(c.out):
            c.out = c.out[n:]
            return False
        c.out = c.send_deadline = None
        self._epoll.modify(c.fd, _IN)  # type: ignore[union-attr]
        return True

    def _sweep(self, now: float) -> None:
        """Close connections idle past idle_timeout_s, with a message not whole by its deadline,
        or with an answer not taken by io_timeout_s."""
        idle_s = self.config.idle_timeout_s
        for c in list(self._conns.values()):
            if c.out is not None and now >= c.send_deadline:
                self._close(c, CloseReason.SEND_TIMEOUT)
            elif c.deadline is not None and now >= c.deadline:
                self.metrics.record_error(ErrorCode.INCOMPLETE)
                self._close(c, CloseReason.MESSAGE_TIMEOUT)
            elif idle_s > 0 and c.idle_since is not None and now - c.idle_since >= idle_s:
                self._close(c, CloseReason.IDLE_TIMEOUT)

    # ------------------------------------------------------------------ connections

    def _accept_all(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and the like: back off, keep serving the others
                log.warning("cannot accept a connection: %s", e)
                self._epoll.unregister(self._listener.fileno())  # type: ignore[union-attr]
                self._accept_paused_until = _mono() + 0.01
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        """Serve `conn`, evicting the longest-idle connection when every slot is taken, or
        refuse it with `busy`."""
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
        if victim is not None:
            log.info("closing the connection idle longest (pid %d) for a new one", victim.pid)
            self._close(victim, CloseReason.EVICTED)
        if refusal is not None:
            conn.setblocking(True)
            self._refuse(conn, refusal)
            return
        conn.setblocking(False)
        c = _Connection(self, conn, pid)
        with self._conns_lock:
            self._conns[c.fd] = c
            self._per_peer[pid] += 1
        self._epoll.register(c.fd, _IN)  # type: ignore[union-attr]
        self.metrics.connections_total.inc()
        self.metrics.connections_active.inc()

    def _longest_idle(self) -> _Connection | None:
        """The connection waiting for its next message the longest, if EVICT_IDLE_S or more."""
        oldest, since = None, _mono() - EVICT_IDLE_S
        for c in self._conns.values():
            t = c.idle_since
            if t is not None and t <= since:
                oldest, since = c, t
        return oldest

    def _forget(self, c: _Connection) -> bool:
        """Free `c`'s slot and stop watching it; False when it was gone already."""
        with self._conns_lock:
            if self._conns.pop(c.fd, None) is None:
                return False
            self._per_peer[c.pid] -= 1
            if not self._per_peer[c.pid]:
                del self._per_peer[c.pid]
        c.alive = False
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(c.fd)  # type: ignore[union-attr]
        return True

    def _close(self, c: _Connection, reason: CloseReason) -> None:
        if not self._forget(c):
            return
        self._closed[reason].inc()
        self.metrics.connections_active.dec()
        c.sock.close()

    def _fatal(self, c: _Connection, answer: bytes, code: ErrorCode,
               reason: CloseReason) -> None:
        """Answer, then close: the stream cannot be trusted to continue. The answer goes out
        (and what the client still sends is drained) on a short-lived thread, off the loop."""
        self.metrics.record_error(code)
        if not self._forget(c):
            return
        pending = bytes(c.out) if c.out is not None else b""

        def finish() -> None:
            try:
                c.sock.setblocking(True)
                _send_last(c.sock, pending + answer)
            finally:
                self._closed[reason].inc()
                self.metrics.connections_active.dec()
                c.sock.close()

        threading.Thread(target=finish, name="agent-close", daemon=True).start()

    def _refuse(self, conn: socket.socket, message: str) -> None:
        """Answer `busy` and close; in the client's framing when its first bytes come within
        BUSY_PEEK_S (on a short-lived thread, so serving goes on)."""
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
    """One client's bytes: `buf[start:end]` holds what was received and not yet answered.

    `receive` reads what the socket has; `process` answers the complete messages in the buffer,
    except a single-row PREDICT frame, which it leaves in `held` for the loop to answer with
    the other connections' (and stops there, so answers keep their order). `idle_since` is set
    while the connection waits for its next message (the server evicts by it), `deadline` while
    a message is partial, `out` and `send_deadline` while an answer waits for the client to
    read it (nothing more is read from it meanwhile).
    """

    __slots__ = ("alive", "buf", "deadline", "dispatch", "end", "fd", "held", "idle_since",
                 "max_frame", "max_line", "out", "pid", "queued", "scanned", "send_deadline",
                 "server", "sock", "start")

    def __init__(self, server: AgentServer, sock: socket.socket, pid: int) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.pid = pid
        self.idle_since: float | None = _mono()
        self.alive = True
        self.queued = False  # in the loop's list of connections to process
        self.buf = bytearray(_INITIAL_BUFFER)
        self.start = self.end = 0
        self.scanned = 0  # a partial line: searched for its newline up to here
        self.deadline: float | None = None  # of the partial message at `start`
        self.out: memoryview | None = None
        self.send_deadline: float | None = None
        self.held: tuple | None = None  # (buf, offset, tag, columns, t0) of a single-row frame
        self.dispatch = server.dispatch
        self.max_line = server.config.max_line_bytes
        self.max_frame = server.config.max_frame_bytes

    def receive(self) -> bool:
        """Read what the socket has; False when the connection ended."""
        if self.end == len(self.buf):  # full of complete messages: answer them first
            return True
        try:
            if self.end:
                n = self.sock.recv_into(memoryview(self.buf)[self.end:])
            else:  # the usual case, a new message: no view to make
                n = self.sock.recv_into(self.buf)
        except BlockingIOError:
            return False
        except OSError as e:
            log.debug("connection closed: %s", e)
            self.server._close(self, CloseReason.RESET)
            return False
        if not n:
            if self.start == self.end:
                self.server._close(self, CloseReason.CLIENT)
            else:  # hung up mid-message
                self.server.metrics.record_error(ErrorCode.INCOMPLETE)
                self.server._close(self, CloseReason.INCOMPLETE)
            return False
        self.end += n
        self.idle_since = None
        return True

    def answer_one(self) -> bool:
        """Answer the buffer when it holds exactly one single-row PREDICT frame (a tester with
        one die in flight, the common case) and return True; else False, leaving it all to
        `process`. The same answer `process` gives, with none of its bookkeeping."""
        buf, end = self.buf, self.end
        if self.start or end < HEADER_SIZE or end > _INITIAL_BUFFER or \
                not buf.startswith(_ONE_ROW_PREFIX):
            return False
        tag, rows, columns, length = _HEADER_TAIL(buf, 8)
        if rows != 1 or length != 8 + 4 * columns or end != HEADER_SIZE + length or \
                end > self.max_frame:
            return False
        t0 = _perf()
        self.start = end
        self.deadline = None
        answer = self.dispatch.frame(buf, 0, tag, 1, columns, t0)
        if self.send(answer):
            tap = self.server.tap
            if tap is not None:  # the prediction log, after the answer went out
                tap(buf, 0, end, answer)
            self.settle()
        return True

    def process(self, held: list[_Connection]) -> None:
        """Answer the complete messages in the buffer (see the class docstring)."""
        buf, dispatch, tap = self.buf, self.dispatch, self.server.tap
        while self.start < self.end and self.out is None and self.alive:
            m0 = self.start
            if buf[m0] == MAGIC_BYTE:
                if self.end - m0 < HEADER_SIZE:
                    return self._partial(HEADER_SIZE)
                # magic, version, type, flags, tag, rows, columns, length
                h = HEADER_UNPACK(buf, m0)
                if (h[0] != MAGIC or h[1] != PROTOCOL_VERSION or h[2] != FrameType.PREDICT
                        or h[3] or h[7] != h[5] * (8 + 4 * h[6])):
                    try:
                        parse_header(buf, m0)  # names what is wrong
                    except ProtocolError as e:
                        return self.server._fatal(self, encode_error_frame(e, h[4]), e.code,
                                                  CloseReason.BAD_FRAME)
                total = HEADER_SIZE + h[7]
                if total > self.max_frame:
                    return self.server._fatal(self, encode_error_frame(ProtocolError(
                        ErrorCode.TOO_LARGE, f"frame: {total} bytes, at most {self.max_frame} "
                        "allowed (send smaller batches)"), h[4]), ErrorCode.TOO_LARGE,
                        CloseReason.TOO_LARGE)
                if self.end - m0 < total:
                    return self._partial(total)
                if total > _INITIAL_BUFFER:
                    self.server.trimmer.note()
                self.deadline = None
                self.start = m1 = m0 + total
                if h[2] == FrameType.PREDICT:
                    if h[5] == 1:  # answered with the other connections' single rows
                        self.held = (buf, m0, h[4], h[6], _perf())
                        held.append(self)
                        return None
                    if h[5] > BIG_ROWS:
                        return self.server.hand_off(self, partial(
                            dispatch.frame, buf, m0, h[4], h[5], h[6], _perf()), m0, m1)
                    answer = dispatch.frame(buf, m0, h[4], h[5], h[6], _perf())
                else:  # a LABEL frame (agent/labels.py)
                    answer = answer_label_frame(dispatch.labels, buf, m0, h[4], h[5])
            else:
                idx = buf.find(b"\n", max(self.scanned, m0), self.end)
                if idx < 0 or idx - m0 > self.max_line:
                    if idx < 0 and self.end - m0 <= self.max_line:
                        self.scanned = self.end
                        return self._partial(self.end - m0 + 1)
                    return self.server._fatal(self, encode_json(error_json(ProtocolError(
                        ErrorCode.TOO_LARGE, f"line: longer than {self.max_line} bytes "
                        "(send smaller batches, or binary frames)"))), ErrorCode.TOO_LARGE,
                        CloseReason.TOO_LARGE)
                if idx - m0 > _INITIAL_BUFFER:  # a big batch: trim once they stop
                    self.server.trimmer.note()
                t0 = _perf()
                stop = idx - 1 if idx > m0 and buf[idx - 1] == 13 else idx  # \r\n
                m1 = stop
                self.deadline = None
                self.start = idx + 1
                if stop == m0:
                    continue  # blank line: ignored
                if stop - m0 > BIG_LINE:
                    return self.server.hand_off(self, partial(
                        dispatch.json_line, memoryview(buf)[m0:stop], t0), m0, m1)
                answer = dispatch.json_line(memoryview(buf)[m0:stop], t0)
            if not self.send(answer):
                return None
            if tap is not None:  # the prediction log, after the answer went out
                tap(buf, m0, m1, answer)
        if self.alive and self.held is None:
            self.settle()
        return None

    def settle(self) -> None:
        """After answering: an empty buffer means idle (and small again); else the rest is a
        partial message, whose deadline `_partial` set."""
        if self.start == self.end and self.out is None:
            self.start = self.end = self.scanned = 0
            self.idle_since = _mono()
            if len(self.buf) > _INITIAL_BUFFER:  # after a big frame: give memory back
                self.buf = bytearray(_INITIAL_BUFFER)

    def _partial(self, want: int) -> None:
        """The message at `start` is not whole: make room for `want` bytes of it and give it
        until message_timeout_s from now (its first wait) to arrive."""
        if self.deadline is None:
            self.deadline = _mono() + self.server.config.message_timeout_s
        if len(self.buf) - self.start < want:  # compact, or grow
            pending = self.end - self.start
            if want <= len(self.buf):
                self.buf[:pending] = self.buf[self.start:self.end]
            else:
                new = bytearray(max(want, 2 * len(self.buf)))
                new[:pending] = self.buf[self.start:self.end]
                self.buf = new
            self.scanned = max(self.scanned - self.start, 0)
            self.start, self.end = 0, pending

    def send(self, answer: bytes) -> bool:
        """Send `answer`, keeping what the client does not take yet for the loop to send when
        it can (reading from the client stops until then); False when the connection ended."""
        try:
            n = self.sock.send(answer)
        except BlockingIOError:
            n = 0
        except OSError as e:
            log.debug("connection closed: %s", e)
            self.server._close(self, CloseReason.RESET)
            return False
        if n < len(answer):
            self.out = memoryview(answer)[n:]
            self.send_deadline = _mono() + self.server.config.io_timeout_s
            self.server._epoll.modify(self.fd, _OUT)  # type: ignore[union-attr]
        return True


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
