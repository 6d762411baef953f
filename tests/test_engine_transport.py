"""KV transport: exact bytes through shm and tcp, authentication, pool limits, link teardown, the bench helper."""

from __future__ import annotations

import hashlib
import queue
import threading

import numpy as np
import pytest

from engine.transport import AuthError, TransportError, connect, listen, new_secret
from engine.transport.bench import measure, memcpy_bandwidth

pytestmark = pytest.mark.timeout(60)


class Pair:
    """A listener and one connected client; messages the listener side receives land in ``inbox``."""

    def __init__(self, kind: str, secret: bytes | None = None):
        self.secret = secret or new_secret()
        self.inbox: queue.Queue = queue.Queue()
        self.closed: queue.Queue = queue.Queue()
        self.server_ch: queue.Queue = queue.Queue()

        def on_connect(ch):
            self.server_ch.put(ch)
            ch.start(self.inbox.put, self.closed.put)

        self.listener = listen(kind, self.secret, on_connect)
        self.client = connect(kind, self.listener.address, self.secret)
        self.client.start(lambda m: None)
        self.server = self.server_ch.get(timeout=5)

    def close(self) -> None:
        self.client.close()
        self.listener.close()


@pytest.fixture(params=["shm", "tcp"])
def pair(request):
    p = Pair(request.param)
    yield p
    p.close()


def test_headers_and_bodies_arrive_exactly(pair):
    rng = np.random.default_rng(1)
    bodies = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 4095, 70_000, 3 << 20)]
    pair.client.send({"kind": "hello", "ids": [1, 2, 3]})
    for i, b in enumerate(bodies):
        if i % 2:
            buf = pair.client.alloc(len(b))
            buf.view[:] = b
            pair.client.send({"i": i, "sha": hashlib.sha256(b).hexdigest()}, buf)
        else:
            pair.client.send({"i": i, "sha": hashlib.sha256(b).hexdigest()}, b)
    m = pair.inbox.get(timeout=5)
    assert m.header == {"kind": "hello", "ids": [1, 2, 3]} and m.body is None
    for i, b in enumerate(bodies):
        m = pair.inbox.get(timeout=5)
        assert m.header["i"] == i and m.nbytes == len(b)
        assert hashlib.sha256(m.body).hexdigest() == m.header["sha"] == hashlib.sha256(b).hexdigest()
        pair.server.release(m)


def test_released_bodies_are_reused_not_leaked(pair):
    import time

    payload = bytes(1 << 20)
    for _ in range(30):
        pair.client.send({}, payload)
        pair.server.release(pair.inbox.get(timeout=5))
        if pair.client.kind == "shm":  # the release reaches the sender asynchronously: wait for it (a busy host
            deadline = time.monotonic() + 5  # can otherwise send the next body first, into a new segment)
            while not pair.client._free and time.monotonic() < deadline:
                time.sleep(0.001)
    if pair.client.kind == "shm":
        assert pair.client._own_bytes <= 2 << 20  # one segment, recycled every time


def test_shm_pool_exhaustion_is_a_clear_error():
    p = Pair("shm")
    try:
        p.client.max_bytes, p.client.alloc_timeout_s = 2 << 20, 0.3
        p.client.send({}, bytes(1 << 20))  # held by the receiver (never released)
        p.client.send({}, bytes(1 << 20))
        with pytest.raises(TransportError, match="exhausted"):
            p.client.send({}, bytes(1 << 20))
        with pytest.raises(TransportError, match="exceeds"):
            p.client.alloc(64 << 20)
    finally:
        p.close()


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_wrong_secret_is_rejected_and_listener_keeps_serving(kind):
    p = Pair(kind)
    try:
        with pytest.raises(AuthError):
            connect(kind, p.listener.address, new_secret())
        again = connect(kind, p.listener.address, p.secret)
        again.start(lambda m: None)
        again.send({"ok": True})
        assert p.inbox.get(timeout=5).header == {"ok": True}
        again.close()
    finally:
        p.close()


def test_peer_close_is_reported_and_send_fails(pair):
    pair.client.close()
    assert pair.closed.get(timeout=5) is None
    with pytest.raises(TransportError):
        pair.client.send({})


def test_connect_to_nothing_is_a_transport_error():
    with pytest.raises(TransportError):
        connect("tcp", "127.0.0.1:1", new_secret(), timeout_s=2)
    with pytest.raises(TransportError):
        connect("shm", "@disagg-nobody-listens-here", new_secret(), timeout_s=2)
    with pytest.raises(ValueError, match="unknown transport"):
        connect("carrier-pigeon", "x", new_secret())


def test_concurrent_senders_do_not_interleave_frames(pair):
    def blast(tag: int) -> None:
        for j in range(50):
            pair.client.send({"tag": tag, "j": j}, bytes([tag]) * (1000 + j))

    threads = [threading.Thread(target=blast, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen: dict[int, int] = {}
    for _ in range(200):
        m = pair.inbox.get(timeout=5)
        tag, j = m.header["tag"], m.header["j"]
        assert bytes(m.body) == bytes([tag]) * (1000 + j)
        assert seen.get(tag, -1) == j - 1
        seen[tag] = j
        pair.server.release(m)


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_bench_measure_returns_raw_verified_samples(kind):
    samples = measure(kind, [4096, 1 << 20], repeats=3, verify=True)
    assert len(samples) == 6
    assert {s["nbytes"] for s in samples} == {4096, 1 << 20}
    assert all(s["seconds"] > 0 and s["bytes_per_s"] > 0 and s["kind"] == kind for s in samples)
    assert memcpy_bandwidth(1 << 20, repeats=3) > 1e8


def test_cuda_transport_needs_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("GPU present: exercised by the GPU suite")
    with pytest.raises(TransportError, match="CUDA"):
        listen("cuda", new_secret(), lambda ch: None)
