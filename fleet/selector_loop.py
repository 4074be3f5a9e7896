"""One thread for many MQTT clients: `SelectorLoop` drives paho clients with `selectors`
(epoll) instead of one network thread per client. The simulator runs thousands of devices on
it, the controller its one client (paho's own loop uses select(), which stalls above
descriptor 1023).

A client that receives a stream (the controller: every device's states and events) is a
`ReadAheadClient`: paho reads each packet with three or more `recv` calls (its first byte, each
byte of its length, the rest) and one packet per wake-up; read ahead, one `recv` brings up to
64 KB, every whole PUBLISH in it is taken from the buffer in one go (the rest goes through
paho), and `batch_s` lets a few milliseconds of messages gather before each read
(docs/scale.md: the controller's cost per message).
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

_LOG = logging.getLogger("edgefleet.fleet")

__all__ = ["ReadAheadClient", "SelectorLoop"]

_READ_AHEAD = 65536
_PUBLISH = int(mqtt.PUBLISH)  # a packet's type, its first byte's high nibble
BATCH_FILL = 10  # packets a batch wait aims at: half of the broker's in-flight window (20)


class _Message(mqtt.MQTTMessage):
    """A received message as `ReadAheadClient` hands it to `on_message`: paho's, without the
    `info` (a publish's delivery tracker, with a lock and a condition, of no use to a
    receiver) and the timestamp."""

    __slots__ = ()

    def __init__(self, topic: bytes, payload: bytes, qos: int, mid: int, retain: bool,
                 dup: bool) -> None:
        self._topic, self.payload, self.qos, self.mid = topic, payload, qos, mid
        self.retain, self.dup = retain, dup
        self.timestamp, self.state, self.info, self.properties = 0.0, 0, None, None


class ReadAheadClient(mqtt.Client):
    """A paho client for a process that follows a stream (the controller: every device's
    states and events), once a `SelectorLoop` drives it:

    - its socket reads take up to 64 KB at a time: a PUBLISH whole in that buffer is cut from
      it directly, and paho's reads of any other packet's first byte, its length and its body
      are served from it instead of one system call each;
    - a PUBLISH (MQTT 3.1.1, QoS 0 or 1) goes to `on_message` without paho's per-message
      extras (a debug line formatted, a delivery tracker with a lock and a condition, the
      topic decoded three times, the per-topic callback lookup); MQTT 5, QoS 2, manual
      acknowledgements, per-topic callbacks (`message_callback_add`) or a packet it cannot
      read go through paho's own handling.

    Off (paho's own reads and handling) until the loop turns it on: paho's own network loop
    (`loop_start`) waits on the socket with select(), which cannot see bytes already in this
    buffer."""

    read_ahead = False
    _rbuf = b""
    _rpos = 0
    _filtered = False
    # `on_batch(client, userdata, messages)`, if set, takes the PUBLISH packets of one read
    # that this client delivers itself, in one call (the controller parses them, then takes
    # its lock and wakes its waiters once per read); `on_message` otherwise, one at a time
    on_batch: Callable[[mqtt.Client, Any, list[mqtt.MQTTMessage]], None] | None = None
    windowed = 0  # QoS 1 messages delivered so far (the broker's window: `_batch_wait`)

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._filtered = True
        super().message_callback_add(sub, callback)

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        """Every PUBLISH already whole in the read-ahead buffer, from its read position on, is
        taken from it in one go (paho reads a packet a byte or a field at a time, each through
        `_sock_recv`, and one packet a call); anything else (another packet type, a packet cut
        at the buffer's end, one paho has begun, one `_deliverable` refuses) is paho's."""
        if not self.read_ahead or self._in_packet["command"]:
            return super()._packet_read()
        if self._rpos >= len(self._rbuf):  # used up: the next read first
            try:
                if not self._fill(_READ_AHEAD):
                    return super()._packet_read()  # the connection closed: paho says so
            except BlockingIOError:
                return mqtt.MQTTErrorCode.MQTT_ERR_AGAIN  # nothing more yet
            except OSError:
                return super()._packet_read()  # paho logs it: the connection is lost
        buf, pos = self._rbuf, self._rpos
        if buf[pos] & 0xF0 != _PUBLISH:
            return super()._packet_read()
        packets = []
        while pos < len(buf) and buf[pos] & 0xF0 == _PUBLISH:
            span = _whole(buf, pos)
            if span is None:
                break  # cut short (or malformed: paho says so)
            packet = buf[span[0]:span[1]]
            if not self._deliverable(buf[pos], packet):
                break
            packets.append((buf[pos], packet))
            pos = span[1]
        if not packets:
            return super()._packet_read()
        self._rpos = pos
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()  # as paho does (keepalive)
        return self._deliver(packets)

    def _deliverable(self, header: int, packet: bytes | bytearray) -> bool:
        """Whether `_deliver` takes this PUBLISH (else paho's own handling does)."""
        qos = (header & 0x06) >> 1
        if not self.read_ahead or qos == 2 or self._filtered or self._manual_ack or \
                self._protocol == mqtt.MQTTv5 or len(packet) < 2:
            return False
        end = 2 + ((packet[0] << 8) | packet[1])
        return end != 2 and end + 2 * qos <= len(packet)  # a topic, and not cut short

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        if not self._deliverable(header, packet):
            if header & 0x06:
                self.windowed += 1  # (QoS 1 or 2) paho's to acknowledge; counted all the same
            return super()._handle_publish()  # paho says what is wrong with it
        return self._deliver([(header, bytes(packet))])

    def _deliver(self, packets: list[tuple[int, bytes]]) -> mqtt.MQTTErrorCode:
        """Hand `packets` (PUBLISH: header byte, body) to `on_batch` or `on_message`, then
        acknowledge the QoS 1 ones, in order (as paho: after the callback)."""
        msgs = []
        for header, packet in packets:
            qos = (header & 0x06) >> 1
            end = 2 + ((packet[0] << 8) | packet[1])
            mid = (packet[end] << 8) | packet[end + 1] if qos else 0
            msgs.append(_Message(packet[2:end], packet[end + 2 * qos:], qos, mid,
                                 bool(header & 0x01), bool(header & 0x08)))
        on_batch, on_message = self.on_batch, self.on_message
        with self._in_callback_mutex:
            if on_batch is not None:
                self._callback(on_batch, msgs)
            elif on_message is not None:
                for msg in msgs:
                    self._callback(on_message, msg)
        rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        for msg in msgs:
            if msg.qos:
                self.windowed += 1
                sent = self._send_puback(msg.mid)
                if rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                    rc = sent  # the first failure, if any
        return rc

    def _callback(self, fn: Callable[..., None], arg: Any) -> None:
        try:
            fn(self, self._userdata, arg)
        except Exception as err:
            self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
            if not self.suppress_exceptions:
                raise

    def _fill(self, bufsize: int) -> bool:
        """One `recv` of up to `bufsize` bytes into the used-up buffer (BlockingIOError: none
        yet); False when the connection closed."""
        buf = super()._sock_recv(bufsize)
        if not buf:
            return False
        self._rbuf, self._rpos = buf, 0
        return True

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self.read_ahead:
            return super()._sock_recv(bufsize)
        if self._rpos >= len(self._rbuf) and not self._fill(max(bufsize, _READ_AHEAD)):
            return b""  # the connection closed
        pos = self._rpos
        self._rpos = pos + bufsize
        return self._rbuf[pos:pos + bufsize]

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._rbuf) - self._rpos

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        """Packets queued one after the other go out in one `send` (paho sends each packet
        with its own: a batch's ten acknowledgements, or a round's ten commands, were ten
        system calls, each also waking the broker), except those paho does something with
        once sent (a QoS 0 PUBLISH: `on_publish`; DISCONNECT), which keep their own. Other
        threads only append (a publish): what is queued meanwhile stays behind."""
        out = self._out_packet
        if self.read_ahead and len(out) > 1:
            runs: list[list[dict[str, Any]]] = []
            for packet in [out.popleft() for _ in range(len(out))]:
                if runs and _plain(packet) and _plain(runs[-1][-1]):
                    runs[-1].append(packet)
                else:
                    runs.append([packet])
            for run in reversed(runs):
                out.appendleft(run[0] if len(run) == 1 else _joined(run))
        return super()._packet_write()

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0  # a new connection starts with an empty buffer
        super()._sock_close()


def _plain(packet: dict[str, Any]) -> bool:
    """A queued packet paho does nothing with once it is sent (`_packet_write`): not a QoS 0
    PUBLISH (`on_publish`), not a DISCONNECT."""
    kind = packet["command"] & 0xF0
    return kind != mqtt.DISCONNECT and not (kind == _PUBLISH and packet["qos"] == 0)


def _joined(run: list[dict[str, Any]]) -> dict[str, Any]:
    """One queued packet of `run`'s bytes (what is left of each), sent as one."""
    data = b"".join(p["packet"][p["pos"]:] for p in run)
    return {"command": mqtt.PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": len(data),
            "packet": data, "info": None}


def _whole(buf: bytes, pos: int) -> tuple[int, int] | None:
    """Where the body of the packet at `pos` starts and ends, if `buf` holds all of it (its
    remaining length: 1 to 4 bytes, 7 bits each); None if it is cut short or malformed."""
    i, length, shift = pos + 1, 0, 0
    while True:
        if i >= len(buf) or shift > 21:
            return None
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    return (i, i + length) if i + length <= len(buf) else None


@dataclass
class _Entry:
    client: mqtt.Client
    tick: Callable[[], None] | None
    sock: Any = None
    writing: bool = False  # EVENT_WRITE is registered for `sock`
    want_write: bool = False  # paho has bytes to send
    next_connect: float = 0.0
    delay: float = 0.0
    connected_since: float | None = None


class SelectorLoop:
    """Drives many paho clients (each with `connect_async` already called) from one thread with
    `selectors`, `loop_read`, `loop_write` and `loop_misc`, instead of one network thread per
    client (`loop_start`). Reconnects with exponential backoff and jitter. `tick` callables run
    on the loop thread about every `tick_s` seconds and must not block.

    `reconnect()` (TCP connect and TLS handshake) blocks the loop thread while it runs; against a
    broker on the local network that is milliseconds, and a refused connection returns at once.

    `batch_s` > 0: after a round that read something, the loop waits that long before it looks
    again, so a stream of messages is read in batches (one wake-up, one read of many packets)
    instead of one wake-up per message (a wake-up costs tens of microseconds of CPU on a
    small VM). What a client publishes meanwhile ends the wait (`_wake`): reads wait, sends
    do not. For a process that follows a stream (the controller), not for the simulator's
    devices.
    """

    def __init__(self, *, reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0,
                 tick_s: float = 1.0, name: str = "mqtt-selector", batch_s: float = 0.0) -> None:
        self.reconnect_min_s, self.reconnect_max_s, self.tick_s = (
            reconnect_min_s, reconnect_max_s, tick_s)
        self.batch_s = batch_s
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pause_sel = selectors.DefaultSelector()  # the batch wait: ended by `_wake` alone
        self._pause_sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._last_batch = 0.0  # when the last batch was read (`_batch_wait`)
        self._entries: dict[int, _Entry] = {}  # id(client) -> entry
        self._ops: deque[Callable[[], None]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._connect_budget = 64  # new connections per loop iteration (spreads a start burst)
        self._write_changed: dict[int, _Entry] = {}  # entries whose write interest changed
        self._next_connect = float("inf")  # when a client is next due to (re)connect

    def start(self) -> SelectorLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(10)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, client: mqtt.Client, tick: Callable[[], None] | None = None) -> None:
        entry = _Entry(client, tick)
        if isinstance(client, ReadAheadClient):
            client.read_ahead = True
        client.on_socket_open = lambda c, u, s: self._call(lambda: self._opened(entry, s))
        client.on_socket_close = lambda c, u, s: self._call(lambda: self._closed(entry, s))
        client.on_socket_register_write = lambda c, u, s: self._call(
            lambda: self._set_write(entry, True))
        client.on_socket_unregister_write = lambda c, u, s: self._call(
            lambda: self._set_write(entry, False))
        self._call(lambda: self._added(entry))

    def remove(self, client: mqtt.Client) -> None:
        """Forget a client (call after `client.disconnect()`); the loop flushes nothing more."""
        done = threading.Event()

        def op() -> None:
            entry = self._entries.pop(id(client), None)
            if entry is not None and entry.sock is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(entry.sock)
            done.set()

        self._call(op)
        if threading.current_thread() is not self._thread:
            done.wait(5)

    def disconnect(self, client: mqtt.Client, timeout: float = 1.0) -> None:
        """Send `client`'s DISCONNECT, wait (up to `timeout`) until the loop has flushed it and
        closed the socket, then `remove` it."""
        with contextlib.suppress(Exception):
            client.disconnect()
        deadline = time.monotonic() + timeout
        while client.socket() is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        self.remove(client)

    # -- loop thread ----------------------------------------------------------------------------

    def _call(self, op: Callable[[], None]) -> None:
        self._ops.append(op)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _added(self, entry: _Entry) -> None:
        self._entries[id(entry.client)] = entry
        self._next_connect = 0.0  # connect it now

    def _opened(self, entry: _Entry, sock: Any) -> None:
        if id(entry.client) not in self._entries:
            return
        entry.sock = sock
        entry.writing = entry.want_write = entry.client.want_write()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if entry.writing else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.register(sock, events, entry)

    def _closed(self, entry: _Entry, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)
        if entry.sock is sock:
            entry.sock = None
            entry.writing = False
            entry.connected_since = None
            self._schedule_reconnect(entry)

    def _set_write(self, entry: _Entry, on: bool) -> None:
        """Note paho's write interest; `_apply_writes` registers the last one before the loop
        waits (paho turns it on and off around every packet it sends: one system call, or
        none, instead of two)."""
        entry.want_write = on
        self._write_changed[id(entry)] = entry

    def _apply_writes(self) -> None:
        changed, self._write_changed = self._write_changed, {}
        for entry in changed.values():
            if entry.sock is None or id(entry.client) not in self._entries or \
                    entry.writing == entry.want_write:
                continue
            entry.writing = entry.want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if entry.writing else 0)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.modify(entry.sock, events, entry)

    def _schedule_reconnect(self, entry: _Entry) -> None:
        entry.delay = min(max(entry.delay * 2, self.reconnect_min_s), self.reconnect_max_s)
        entry.next_connect = time.monotonic() + entry.delay * random.uniform(0.5, 1.0)
        self._next_connect = min(self._next_connect, entry.next_connect)

    def _run_ops(self) -> None:
        while self._ops:
            op = self._ops.popleft()
            try:
                op()
            except Exception:
                _LOG.exception("selector loop operation failed")

    def _run(self) -> None:
        """Wait for a socket, a `_wake` (an operation from another thread, a publish, `stop`),
        the next tick or the next reconnection due, whichever comes first: an idle loop
        wakes once a tick, not on a polling interval."""
        next_tick = time.monotonic()
        while not self._stop.is_set():
            self._run_ops()
            self._apply_writes()
            timeout = max(0.0, min(next_tick, self._next_connect) - time.monotonic())
            reads = windowed = 0
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                n, w = self._service(key.data, mask)
                reads, windowed = reads + n, windowed + w
            self._run_ops()
            if reads and self.batch_s > 0:  # `_wake` (a publish, `stop`) ends the wait early
                self._pause_sel.select(self._batch_wait(windowed, time.monotonic()))
            now = time.monotonic()
            if now >= self._next_connect:
                self._next_connect = self._connect_due(now)
            if now >= next_tick:
                next_tick = now + self.tick_s
                for entry in list(self._entries.values()):
                    self._misc(entry, now)
                self._next_connect = min(self._next_connect, now + self.tick_s)  # re-checked

    def _batch_wait(self, windowed: int, now: float) -> float:
        """How long to let the next batch gather: `batch_s`, or less on a fast stream of QoS 1
        messages, so that about BATCH_FILL of them arrive meanwhile (from their rate in the
        last batch). Waiting for more could stall the broker: it stops sending QoS 1 messages
        to a client with 20 unacknowledged (Mosquitto's `max_inflight_messages`), and the
        acknowledgements of a batch go out when it is read. QoS 0 messages (device states)
        have no such window: a batch of them alone waits the whole `batch_s`, so a burst of
        states is read in a few reads, not ten messages a wake-up."""
        span, self._last_batch = now - self._last_batch, now
        if not windowed:
            return self.batch_s
        return min(self.batch_s, BATCH_FILL * span / windowed)

    def _service(self, entry: _Entry, mask: int) -> tuple[int, int]:
        """Read and write what the socket is ready for; returns the packets read (paho's
        reads) and the QoS 1 messages among them (a `ReadAheadClient` counts them; of
        another client, every packet counts)."""
        client = entry.client
        before = client.windowed if isinstance(client, ReadAheadClient) else 0
        reads = self._serve(entry, mask)
        if isinstance(client, ReadAheadClient):
            return reads, client.windowed - before
        return reads, reads

    def _serve(self, entry: _Entry, mask: int) -> int:
        client = entry.client
        packets = 0
        if mask & selectors.EVENT_READ:
            rc = client.loop_read()
            packets += 1
            sock = entry.sock
            # Bytes select cannot see: read ahead into the client's buffer, or (TLS) decrypted
            # and waiting inside the SSL object. paho reads one packet a call.
            ahead = client.buffered if isinstance(client, ReadAheadClient) else None
            while rc == mqtt.MQTT_ERR_SUCCESS and sock is not None and (
                    (ahead is not None and ahead() > 0)
                    or (hasattr(sock, "pending") and sock.pending() > 0)):
                rc = client.loop_read()
                packets += 1
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return packets
            if entry.sock is not None and client.want_write():
                client.loop_write()  # the acknowledgements of what was read, at once
                return packets
        if mask & selectors.EVENT_WRITE and entry.sock is not None:
            client.loop_write()
        return packets

    def _misc(self, entry: _Entry, now: float) -> None:
        client = entry.client
        if entry.sock is not None:
            client.loop_misc()
            if client.is_connected():
                entry.connected_since = entry.connected_since or now
                if now - entry.connected_since > 10:
                    entry.delay = 0.0  # stable again: the next loss retries quickly
        if entry.tick is not None:
            try:
                entry.tick()
            except Exception:
                _LOG.exception("tick failed")

    def _connect_due(self, now: float) -> float:
        """(Re)connect the clients whose time has come (at most `_connect_budget` a call);
        returns when the next one is due (inf: none waits)."""
        budget = self._connect_budget
        due = float("inf")
        for entry in list(self._entries.values()):
            if entry.sock is not None:
                continue
            if now < entry.next_connect:
                due = min(due, entry.next_connect)
                continue
            if budget <= 0:
                return now  # more to connect: come straight back
            budget -= 1
            try:
                entry.client.reconnect()
            except (OSError, ValueError, ssl.SSLError) as e:
                _LOG.debug("connect failed: %s", e)
                if entry.sock is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._sel.unregister(entry.sock)
                    entry.sock = None
                self._schedule_reconnect(entry)
                due = min(due, entry.next_connect)
            else:
                self._run_ops()  # register the new socket now
        return due
