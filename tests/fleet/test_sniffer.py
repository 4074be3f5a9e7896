"""The rollout tests' and bench's CommandSniffer in a process that holds many descriptors, as
the rollout bench's process does with a 1,000-device simulated floor in it (a socket and a
store lock per device): its socket then lands above descriptor 1023, where paho's own loop
(select()) cannot watch it and never saw the SUBACK. Real Mosquitto."""

from __future__ import annotations

import contextlib
import json
import os
import resource
from collections.abc import Iterator

import pytest

from tests.broker_fixtures import broker  # noqa: F401
from tests.fleet.rollout_helpers import CommandSniffer

HIGH = 1100  # descriptors held open before the sniffer connects


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = HIGH + 200
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(HIGH)]
    try:
        yield
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_sniffer_sees_commands_with_its_socket_above_descriptor_1023(
        broker, many_fds) -> None:  # noqa: F811
    sniffer = CommandSniffer(broker.mqtt())  # raised "not acknowledged within 10 s" before
    try:
        sock = sniffer.client.socket()
        assert sock is not None and sock.fileno() > 1023  # the case select() cannot watch
        body = json.dumps({"id": "c-1", "type": "install", "device_id": "box-1"})
        sniffer.client.publish("edgefleet/device/box-1/cmd", json.dumps({"body": body}), qos=1)
        sniffer.sync()
        assert [c["id"] for c in sniffer.by_type("install")] == ["c-1"]
    finally:
        sniffer.close()
