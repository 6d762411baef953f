"""KV and control transport between engine processes: one interface, three implementations.

Kinds (`KINDS`):

- ``shm``  same host; Unix-domain socket for headers, bodies in shared ``memfd`` segments (one copy, none if the
  producer writes into `Channel.alloc`'s buffer). Address ``"@NAME"``.
- ``tcp``  any host; bodies inline in the TCP stream. Address ``"HOST:PORT"`` (127.0.0.1 unless told otherwise).
- ``cuda`` GPU to GPU: headers over TCP, bodies (CUDA tensors) by NCCL send/recv on a private two-rank process group.
  Needs CUDA and NCCL; raises `TransportError` otherwise. Written for GPU runs; not exercised on a CPU-only machine.

The interface (every kind)::

    secret = new_secret()                                   # one per launch; children read it from DISAGG_SECRET
    lst = listen(kind, secret, on_connect)                  # on_connect(ch) runs per authenticated peer
    lst.address                                             # give this to the connecting side
    ch = connect(kind, lst.address, secret, timeout_s=10)   # raises AuthError / TransportError
    ch.start(on_message, on_close)                          # reader thread: on_message(Message), on_close(exc|None)
    buf = ch.alloc(nbytes); fill buf.view; ch.send(header, buf)   # or ch.send(header, any_bytes_like) or no body
    # receiver: msg.header (msgpack-decoded), msg.body (memoryview; torch.Tensor for cuda), msg.t_recv (monotonic s)
    ch.release(msg)                                         # body memory may be reused by the sender
    ch.close(); lst.close()

Every connection is authenticated with a mutual HMAC-SHA256 challenge-response on the launch secret
(`engine.transport.auth`); headers are msgpack, never pickle. `engine.transport.bench` measures a kind's one-way
transfer time against the same run's in-process memcpy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.transport.auth import AuthError, TransportError, new_secret, secret_from_env
from engine.transport.channel import Buffer, Channel, Listener, Message

KINDS = ("shm", "tcp", "cuda")

__all__ = ["KINDS", "AuthError", "Buffer", "Channel", "Listener", "Message", "TransportError", "connect", "listen",
           "new_secret", "secret_from_env"]


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown transport {kind!r}; expected one of {', '.join(KINDS)}")


def listen(kind: str, secret: bytes, on_connect: Callable[[Channel], None], host: str = "127.0.0.1",
           port: int = 0) -> Listener:
    """Accept authenticated links of ``kind``. ``host``/``port`` apply to tcp and cuda (port 0 = a free one)."""
    _check(kind)
    if kind == "shm":
        from engine.transport.shm import listen_shm
        return listen_shm(secret, on_connect)
    if kind == "cuda":
        from engine.transport.cuda import listen_cuda
        return listen_cuda(secret, on_connect, host, port)
    from engine.transport.tcp import listen_tcp
    return listen_tcp(secret, on_connect, host, port)


def connect(kind: str, address: str, secret: bytes, timeout_s: float = 10.0) -> Channel:
    """Open an authenticated link to a listener's ``address``. Raises `AuthError`, `TransportError` or ValueError."""
    _check(kind)
    if kind == "shm":
        from engine.transport.shm import connect_shm
        return connect_shm(address, secret, timeout_s)
    if kind == "cuda":
        from engine.transport.cuda import connect_cuda
        return connect_cuda(address, secret, timeout_s)
    from engine.transport.tcp import connect_tcp
    return connect_tcp(address, secret, timeout_s)
