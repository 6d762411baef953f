"""`Channel`: a framed, authenticated, bidirectional message link over a stream socket, and `Listener`, which accepts
them. Subclasses decide where message bodies travel (inline in the stream for TCP, shared-memory segments for shm).

Frame on the wire: a fixed 25-byte prefix ``<type u8, header_len u32, body_bytes u64, segment u32, offset u64>``, then
the msgpack header, then (inline bodies only) the body bytes. Frame types: DATA (a message), RELEASE (the receiver is
done with a body held in the sender's segment), SEGMENT (a new shared-memory segment; its file descriptor rides along
as SCM_RIGHTS ancillary data), DROP (forget a segment). Headers are msgpack (msgspec): never pickle.

Threads: `start` runs one reader thread that calls ``on_message(Message)`` for each DATA frame and ``on_close(exc)``
once when the link ends. `send` is thread-safe and blocks until the frame is handed to the kernel (at most
``SEND_TIMEOUT_S`` when the peer stops reading, then `TransportError`).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.transport.auth import TransportError, handshake_connector, handshake_listener

log = logging.getLogger(__name__)

FRAME = struct.Struct("<BIQIQ")
DATA, RELEASE, SEGMENT, DROP = 0, 1, 2, 3
INLINE = 0xFFFFFFFF
SEND_TIMEOUT_S = 30.0
MAX_HEADER_BYTES = 16 << 20
_ENCODER = msgspec.msgpack.Encoder()


@dataclass
class Message:
    """One received message. ``body`` (a memoryview, or a torch tensor for the cuda transport) stays valid until
    `Channel.release`; ``t_recv`` is ``time.monotonic()`` (seconds) when its last byte had arrived."""

    header: Any
    body: Any
    nbytes: int
    t_recv: float
    ref: object = None


@dataclass
class Buffer:
    """A writable send buffer from `Channel.alloc`: fill ``view`` (``nbytes`` long), then pass it to `Channel.send`."""

    view: memoryview
    nbytes: int
    ref: object = field(default=None, repr=False)


class Channel:
    """Base link; see the module docstring. Use `engine.transport.connect` / `listen` rather than constructing it."""

    kind = "base"
    family = socket.AF_INET

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.peer = sock, peer
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None
        self._on_close: Callable[[BaseException | None], None] | None = None
        self._close_reported = False
        self._decode: Callable[[bytes], Any] = msgspec.msgpack.decode
        tv = struct.pack("ll", int(SEND_TIMEOUT_S), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    # ---- public --------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def start(self, on_message: Callable[[Message], None], on_close: Callable[[BaseException | None], None] | None = None,
              decoder: Callable[[bytes], Any] | None = None, name: str = "") -> Channel:
        """Start the reader thread. ``decoder`` turns header bytes into an object (default: msgpack to dicts)."""
        if decoder is not None:
            self._decode = decoder
        self._on_close = on_close
        self._reader = threading.Thread(target=self._read_loop, args=(on_message,), daemon=True,
                                        name=f"{self.kind}-reader-{name or self.peer}")
        self._reader.start()
        return self

    def alloc(self, nbytes: int) -> Buffer:
        """A buffer of ``nbytes`` the body can be written into in place (for shm: inside a shared segment)."""
        return Buffer(memoryview(bytearray(nbytes)), nbytes)

    def send(self, header: Any, body: Any = None) -> None:
        """Send one message: ``header`` (msgpack-encodable: dicts, lists, numbers, str, bytes, msgspec Structs) and an
        optional body (a `Buffer` from `alloc`, or any bytes-like object, which is copied). Raises `TransportError`."""
        if self.closed:
            raise TransportError(f"{self.kind} link to {self.peer} is closed")
        h = _ENCODER.encode(header)
        try:
            self._send_frame(h, body)
        except OSError as e:
            self._fail(e)
            raise TransportError(f"{self.kind} send to {self.peer} failed: {e}") from e

    def release(self, msg: Message) -> None:
        """Give a received body back (the sender may reuse its memory). Idempotent; a no-op on a closed link."""
        ref, msg.ref, msg.body = msg.ref, None, None
        if ref is not None and not self.closed:
            self._release(ref)

    def close(self) -> None:
        """Close the link (the reader thread reports ``on_close(None)``). Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._cleanup()

    # ---- subclass hooks ------------------------------------------------------------------------------------------
    def _send_frame(self, header: bytes, body: Any) -> None:
        if body is None:
            with self._send_lock:
                self.sock.sendall(FRAME.pack(DATA, len(header), 0, INLINE, 0) + header)
            return
        view = body.view if isinstance(body, Buffer) else memoryview(body).cast("B")
        with self._send_lock:
            self.sock.sendall(FRAME.pack(DATA, len(header), view.nbytes, INLINE, 0) + header)
            self.sock.sendall(view)

    def _read_body(self, nbytes: int, seg: int, off: int) -> tuple[Any, object]:
        buf = memoryview(bytearray(nbytes))
        self._recv_into(buf)
        return buf, None

    def _release(self, ref: object) -> None:
        pass

    def _control(self, ftype: int, header: bytes, nbytes: int, seg: int, off: int) -> None:
        raise TransportError(f"unexpected frame type {ftype}")

    def _cleanup(self) -> None:
        pass

    # ---- internals -----------------------------------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, view.nbytes
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError
            got += k

    def _read_loop(self, on_message: Callable[[Message], None]) -> None:
        prefix = memoryview(bytearray(FRAME.size))
        exc: BaseException | None = None
        try:
            while not self.closed:
                self._recv_into(prefix)
                ftype, hlen, nbytes, seg, off = FRAME.unpack(prefix)
                if hlen > MAX_HEADER_BYTES:
                    raise TransportError(f"header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
                hbuf = memoryview(bytearray(hlen))
                if hlen:
                    self._recv_into(hbuf)
                if ftype != DATA:
                    self._control(ftype, bytes(hbuf), nbytes, seg, off)
                    continue
                body, ref = self._read_body(nbytes, seg, off) if nbytes else (None, None)
                msg = Message(self._decode(hbuf), body, nbytes, time.monotonic(), ref)
                on_message(msg)
        except EOFError:
            pass
        except OSError as e:
            if not self.closed:
                exc = e
        except Exception as e:  # a bad frame or a failing callback ends the link, loudly
            log.exception("%s link to %s: reader failed", self.kind, self.peer)
            exc = e
        self._fail(exc)

    def _fail(self, exc: BaseException | None) -> None:
        self.close()
        with self._state_lock:
            if self._close_reported:
                return
            self._close_reported = True
        if self._on_close is not None:
            self._on_close(exc)


class Listener:
    """Accepts authenticated links of one transport kind. ``on_connect(channel)`` runs in a short-lived thread per
    connection, after the handshake succeeded; it must call ``channel.start``. Failed handshakes are logged and dropped.
    """

    def __init__(self, channel_cls: type[Channel], secret: bytes, on_connect: Callable[[Channel], None],
                 address: str, sock: socket.socket):
        self.channel_cls, self.secret, self.on_connect, self.address, self.sock = channel_cls, secret, on_connect, address, sock
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"{channel_cls.kind}-accept")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._admit, args=(conn, str(addr or "local")), daemon=True).start()

    def _admit(self, conn: socket.socket, peer: str) -> None:
        try:
            handshake_listener(conn, self.secret, self.channel_cls.kind)
            ch = self.channel_cls(conn, peer)
        except (TransportError, OSError) as e:
            log.warning("%s listener %s: rejected a connection from %s: %s", self.channel_cls.kind, self.address, peer, e)
            conn.close()
            return
        self.on_connect(ch)

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def connect_socket(channel_cls: type[Channel], sockaddr: Any, secret: bytes, peer: str, timeout_s: float) -> Channel:
    """Connect, authenticate and wrap; raises `TransportError` (unreachable, timed out) or `AuthError`."""
    sock = socket.socket(channel_cls.family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(sockaddr)
        handshake_connector(sock, secret, channel_cls.kind, timeout_s)
    except TransportError:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot connect to {channel_cls.kind} endpoint {peer}: {e}") from e
    sock.settimeout(None)
    return channel_cls(sock, peer)
