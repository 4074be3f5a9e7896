"""The least a Python server can do per single-row request, for the agent benchmark: read one
binary PREDICT frame of a known size, run the model on its row the way the agent does (an IO
binding, agent.engine `Engine.predict_one`), and send a fixed-size answer with the score in it.
No checks, no scoring rules, no metrics, no log: what is left of the agent's work when all of
that is gone, so the bench can show how much of the gap to the floor Python itself takes.

    python bench/ort_echo_server.py SOCKET MODEL_DIR REQUEST_BYTES ANSWER_BYTES

MODEL_DIR holds model.onnx and its manifest.json (a store's version directory). Thread per
connection, blocking sockets, like bench/echo_server.py.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.engine import Engine
from agent.manifest import parse_manifest_bytes

_HEADER = 24  # agent.protocol.HEADER_SIZE; the row follows the 8-byte die id


def _handle(conn: socket.socket, engine: Engine, request: int, answer: int) -> None:
    n = engine.manifest.input.n_features
    buf = bytearray(max(request, 1 << 16))
    view = memoryview(buf)
    row = np.frombuffer(buf, np.float32, n, _HEADER + 8)
    out = bytearray(answer)
    with conn:
        while True:
            got = 0
            while got < request:
                k = conn.recv_into(view[got:request])
                if not k:
                    return
                got += k
            score = engine.predict_one(row).score[0]
            struct.pack_into("<f", out, answer - 4, score)
            conn.sendall(out)


def main() -> None:
    path, model_dir = sys.argv[1], Path(sys.argv[2])
    request, answer = int(sys.argv[3]), int(sys.argv[4])
    manifest = parse_manifest_bytes((model_dir / "manifest.json").read_bytes(), "manifest.json")
    engine = Engine(model_dir / "model.onnx", manifest)
    engine.warm_up()
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_handle, args=(conn, engine, request, answer),
                         daemon=True).start()


if __name__ == "__main__":
    main()
