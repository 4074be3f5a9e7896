"""The controller's stream reader (fleet/selector_loop.py): a `ReadAheadClient` on a
`SelectorLoop` that batches its reads gets every message a real Mosquitto delivers, whole and
in order (payloads larger than one read included), with its retain flag, acknowledges QoS 1 at
once (nothing is delivered again on the next connect of its persistent session), and hands a
message with a per-topic callback to paho's own handling."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from agent.link import MqttConfig
from fleet.selector_loop import ReadAheadClient, SelectorLoop
from fleet.transport import controller_client
from tests.agent_support import wait_for

TOPIC = "edgefleet/device/{}/state"


class Reader:
    """A ReadAheadClient subscribed to every device's state, on a batching loop."""

    def __init__(self, broker, client_id: str = "reader") -> None:
        self.got: list[tuple[str, bytes, int, bool]] = []
        self.subscribed = threading.Event()
        self.client = controller_client(broker.mqtt(), client_id)
        assert isinstance(self.client, ReadAheadClient)
        self.client.on_connect = lambda c, *_: c.subscribe(TOPIC.format("+"), qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.got.append(
            (m.topic, m.payload, m.qos, m.retain))
        self.loop = SelectorLoop(reconnect_min_s=1, reconnect_max_s=2, tick_s=0.5,
                                 batch_s=0.1).start()  # as the controller's
        self.loop.add(self.client)
        assert self.subscribed.wait(10)

    def close(self) -> None:
        self.loop.disconnect(self.client)
        self.loop.stop()


@pytest.fixture
def publisher(broker) -> Iterator[mqtt.Client]:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub",
                    protocol=mqtt.MQTTv311)
    c.connect(broker.host, broker.port)
    c.loop_start()
    yield c
    c.disconnect()
    c.loop_stop()


def test_every_message_arrives_whole_in_order_and_acknowledged(broker, publisher):
    publisher.publish(TOPIC.format("old"), b"retained", qos=1, retain=True).wait_for_publish(5)
    reader = Reader(broker)
    try:
        wait_for(lambda: len(reader.got) == 1, what="the retained state")
        assert reader.got[0] == (TOPIC.format("old"), b"retained", 1, True)
        sent = []
        for i in range(400):  # small ones in bursts, and a few larger than one 64 KB read
            size = 150_000 + i if i % 97 == 5 else 50 + i
            payload = bytes([i % 251]) * size
            qos = i % 2
            sent.append((TOPIC.format(f"d{i % 7}"), payload, qos, False))
            info = publisher.publish(sent[-1][0], payload, qos=qos)
        info.wait_for_publish(10)
        wait_for(lambda: len(reader.got) >= 1 + len(sent), what="every message")
        got = reader.got[1:]
        for qos in (0, 1):  # the broker keeps each publisher's order per QoS
            assert [m for m in got if m[2] == qos] == [m for m in sent if m[2] == qos]
        assert len(got) == len(sent)
    finally:
        reader.close()
    again = Reader(broker)  # same client id: the persistent session
    try:
        publisher.publish(TOPIC.format("marker"), b"marker", qos=1).wait_for_publish(5)
        wait_for(lambda: any(m[1] == b"marker" for m in again.got), what="the marker")
        # an unacknowledged QoS 1 message would come again before the marker
        assert [m[1] for m in again.got if not m[3]] == [b"marker"]
    finally:
        again.close()


def test_a_per_topic_callback_gets_paho_handling(broker, publisher):
    seen = threading.Event()
    reader = Reader(broker, client_id="filtered")
    reader.client.message_callback_add(TOPIC.format("special"), lambda *_: seen.set())
    try:
        publisher.publish(TOPIC.format("special"), b"x", qos=1)
        assert seen.wait(10)
        publisher.publish(TOPIC.format("plain"), b"y", qos=0)
        wait_for(lambda: any(m[1] == b"y" for m in reader.got), what="the plain message")
        assert not any(m[1] == b"x" for m in reader.got)  # the callback took it, as paho does
    finally:
        reader.close()


def test_the_reader_reads_on_after_the_broker_restarts(broker):
    """A restarted broker: the reader reconnects (its read-ahead buffer starts empty on the
    new connection) and gets what is published afterwards."""
    reader = Reader(broker, client_id="restarts")
    try:
        broker.restart()
        wait_for(lambda: not reader.client.is_connected(), what="the reader to notice")
        reader.subscribed.clear()
        assert reader.subscribed.wait(30)  # reconnected and subscribed again
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub-2",
                          protocol=mqtt.MQTTv311)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        try:
            for i in range(50):
                info = pub.publish(TOPIC.format("after"), b"%d" % i * 300, qos=1)
            info.wait_for_publish(10)
            wait_for(lambda: sum(m[0] == TOPIC.format("after") for m in reader.got) == 50,
                     what="what was published after the restart")
        finally:
            pub.disconnect()
            pub.loop_stop()
    finally:
        reader.close()


def _publish_packet(topic: str, payload: bytes, qos: int, mid: int = 0,
                    retain: bool = False) -> bytes:
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + (mid.to_bytes(2, "big") if qos else b"") + payload
    n, length = len(body), bytearray()
    while True:
        length.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return bytes([0x30 | qos << 1 | retain]) + bytes(length) + body


class _Chunks:
    """A non-blocking socket that has received `chunks`, one per `recv`."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def recv(self, n: int) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        return self.chunks.pop(0)

    def close(self) -> None:
        self.chunks = []


def test_packets_split_anywhere_between_reads_arrive_whole_once_each():
    """No broker: a stream of PUBLISH packets (QoS 0 and 1, retained, a payload whose length
    takes two bytes) with a PINGRESP among them, cut at every byte boundary between two reads:
    the packets whole in the buffer take the reader's own path, a cut one paho's; each is
    delivered once, whole and in order, each QoS 1 one acknowledged once."""
    packets = [_publish_packet(TOPIC.format("a"), b"s" * 300, 0, retain=True),
               _publish_packet(TOPIC.format("b"), b'{"step":"live"}', 1, mid=7),
               bytes([0xD0, 0x00]),  # PINGRESP: paho's
               _publish_packet(TOPIC.format("c"), b"", 1, mid=8)]
    stream = b"".join(packets)
    want = [(TOPIC.format("a"), b"s" * 300, 0, True),
            (TOPIC.format("b"), b'{"step":"live"}', 1, False),
            (TOPIC.format("c"), b"", 1, False)]
    for cut in range(len(stream) + 1):
        for batched in (False, True):
            got, acks, _ = _read(_Chunks([stream[:cut], stream[cut:]]), batched)
            assert got == want, (cut, batched)
            assert acks == [7, 8], (cut, batched)


def test_the_publishes_whole_in_one_read_are_handed_over_in_one_batch():
    """With `on_batch` (the controller's), every PUBLISH whole in one read is handed over in
    one call, in order, and the QoS 1 ones are acknowledged after it; another packet (a
    PINGRESP) ends a batch."""
    states = [_publish_packet(TOPIC.format(f"d{i}"), b"s" * (100 + i), i % 2, mid=i)
              for i in range(30)]
    stream = b"".join(states[:20]) + bytes([0xD0, 0x00]) + b"".join(states[20:])
    got, acks, batches = _read(_Chunks([stream]), batched=True)
    assert [m[0] for m in got] == [TOPIC.format(f"d{i}") for i in range(30)]
    assert batches == [20, 10]
    assert acks == list(range(1, 30, 2))


def _read(sock: _Chunks, batched: bool = False
          ) -> tuple[list[tuple[str, bytes, int, bool]], list[int], list[int]]:
    """What a controller's client delivers (and acknowledges) of what `sock` received, one
    message at a time or (`batched`) through `on_batch`, whose batch sizes come third."""
    client = controller_client(MqttConfig(port=1), "t")
    got: list[tuple[str, bytes, int, bool]] = []
    acks: list[int] = []
    batches: list[int] = []

    def take(m: mqtt.MQTTMessage) -> None:
        assert m.qos == 0 or m.mid not in acks  # acknowledged only once handed over
        got.append((m.topic, m.payload, m.qos, m.retain))

    client.on_message = lambda c, u, m: take(m)
    if batched:
        client.on_batch = lambda c, u, ms: (batches.append(len(ms)), [take(m) for m in ms])
    client._send_puback = lambda mid: acks.append(mid) or mqtt.MQTT_ERR_SUCCESS
    client._sock = sock
    client.read_ahead = True
    for _ in range(3):  # a read's worth of packets, then the next read's
        while client._packet_read() == mqtt.MQTT_ERR_SUCCESS:
            pass
    assert client.windowed == len(acks)
    return got, acks, batches


def test_a_batch_wait_shortens_on_a_fast_stream_to_keep_the_brokers_window_open():
    """After a read the loop lets the next batch gather for `batch_s`, or, on a stream of QoS 1
    messages fast enough to bring more than BATCH_FILL in that time, only as long as
    BATCH_FILL take: the broker stops at 20 unacknowledged QoS 1 messages, and a longer wait
    would cap the stream at 20 a batch."""
    from fleet.selector_loop import BATCH_FILL

    loop = SelectorLoop(batch_s=0.1)  # not started: `_batch_wait` is arithmetic on the clock
    loop._batch_wait(1, 100.0)
    assert loop._batch_wait(2, 101.0) == 0.1  # 2 packets a second: the whole batch_s
    # 1,000 packets a second: BATCH_FILL of them take BATCH_FILL ms
    assert loop._batch_wait(50, 101.05) == pytest.approx(BATCH_FILL / 1000)
    assert BATCH_FILL < 20
    # QoS 0 messages alone (a burst of device states) have no window to keep open
    assert loop._batch_wait(0, 101.051) == 0.1


class _Sink:
    """A non-blocking socket that takes at most `room` bytes a `send`."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data[:self.room]))
        return len(self.sent[-1])

    def close(self) -> None:
        pass


@pytest.mark.parametrize("room", [1 << 20, 5])
def test_queued_packets_go_out_in_one_send_except_those_paho_acts_on_once_sent(room):
    """A batch's acknowledgements and a round's QoS 1 commands go out in one `send`; a QoS 0
    PUBLISH (paho calls `on_publish` once it is out) keeps its own, and a socket that takes a
    few bytes at a time still gets every byte, in order."""
    client = controller_client(MqttConfig(port=1), "t")
    client.read_ahead = True
    client.on_socket_register_write = lambda *_: None  # as on a loop: it writes when told
    client._sock = sink = _Sink(room)
    published: list[int] = []
    client.on_publish = lambda c, u, mid, rc, props: published.append(mid)
    qos1 = _publish_packet("edgefleet/device/a/cmd", b"signed", 1, mid=3)
    qos0 = _publish_packet("t", b"x", 0)
    client._send_puback(1)
    client._send_puback(2)
    client._packet_queue(mqtt.PUBLISH, qos1, 3, 1, mqtt.MQTTMessageInfo(3))
    client._packet_queue(mqtt.PUBLISH, qos0, 4, 0, mqtt.MQTTMessageInfo(4))
    client._send_puback(5)
    client._send_puback(6)
    assert client.loop_write() == mqtt.MQTT_ERR_SUCCESS
    acks = [bytes([0x40, 2, 0, mid]) for mid in (1, 2, 5, 6)]
    assert b"".join(sink.sent) == acks[0] + acks[1] + qos1 + qos0 + acks[2] + acks[3]
    assert published == [4]
    if room > 100:
        assert sink.sent == [acks[0] + acks[1] + qos1, qos0, acks[2] + acks[3]]
    assert not client.want_write()
