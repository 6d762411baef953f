"""TCP transport: bodies travel inline in the stream. Works across hosts; binds 127.0.0.1 unless told otherwise.

Addresses are ``"HOST:PORT"``. Received bodies land in pooled receive buffers, reused after `Channel.release`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from engine.transport.channel import Channel, Listener, connect_socket

SOCK_BUFFER_BYTES = 4 << 20
POOL_BUFFERS = 8


class TcpChannel(Channel):
    kind = "tcp"
    family = socket.AF_INET

    def __init__(self, sock: socket.socket, peer: str):
        super().__init__(sock, peer)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUFFER_BYTES)
        self._pool: list[bytearray] = []
        self._pool_lock = threading.Lock()

    def _read_body(self, nbytes: int, seg: int, off: int) -> tuple[Any, object]:
        with self._pool_lock:
            fits = [b for b in self._pool if len(b) >= nbytes]
            buf = min(fits, key=len) if fits else None
            if buf is not None:
                self._pool.remove(buf)
        if buf is None:
            buf = bytearray(max(nbytes, 4096))
        view = memoryview(buf)[:nbytes]
        self._recv_into(view)
        return view, buf

    def _release(self, ref: object) -> None:
        with self._pool_lock:
            if len(self._pool) < POOL_BUFFERS:
                self._pool.append(ref)  # type: ignore[arg-type]


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); raises ValueError naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad TCP address {address!r}; expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def listen_tcp(secret: bytes, on_connect: Callable[[Channel], None], host: str = "127.0.0.1", port: int = 0,
               channel_cls: type[Channel] = TcpChannel) -> Listener:
    """Listen on ``host:port`` (0 = a free port; see ``Listener.address``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    h, p = sock.getsockname()[:2]
    return Listener(channel_cls, secret, on_connect, f"{h}:{p}", sock)


def connect_tcp(address: str, secret: bytes, timeout_s: float = 10.0, channel_cls: type[Channel] = TcpChannel) -> Channel:
    return connect_socket(channel_cls, split_address(address), secret, address, timeout_s)
