"""Shared-memory transport (same host): a Unix-domain socket carries headers, bodies live in ``memfd`` segments.

The sender owns a pool of segments per link (sizes are powers of two, >= 64 KiB, pre-faulted once). `alloc` hands
out a whole free segment; the body is written straight into it (one copy, or none when the producer writes in
place), and only a 25-byte frame plus the header crosses the socket. The receiver maps each segment once (its file
descriptor is passed with SCM_RIGHTS the first time), reads the body in place, and `release` sends it back.
Because segments are anonymous memfds, nothing is left in /dev/shm when a process dies.

Addresses are ``"@NAME"`` (Linux abstract socket namespace; no file to clean up). ``max_bytes`` bounds one
direction's pool: `alloc` waits (up to ``SEND_TIMEOUT_S``) for releases when it is exhausted, then raises.
"""

from __future__ import annotations

import array
import mmap
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.transport.auth import TransportError
from engine.transport.channel import (
    DATA,
    DROP,
    FRAME,
    RELEASE,
    SEGMENT,
    SEND_TIMEOUT_S,
    Buffer,
    Channel,
    Listener,
    connect_socket,
)

MIN_SEGMENT_BYTES = 64 << 10
DEFAULT_MAX_BYTES = 512 << 20
PAGE = 4096


class _Segment:
    def __init__(self, seg_id: int, size: int, mm: mmap.mmap):
        self.id, self.size, self.mm = seg_id, size, mm
        self.view = memoryview(mm)

    def close(self) -> None:
        try:
            self.view.release()
            self.mm.close()
        except BufferError:  # a body view is still referenced somewhere; the GC unmaps it later
            pass


def segment_size(nbytes: int) -> int:
    return max(MIN_SEGMENT_BYTES, 1 << max(nbytes - 1, 1).bit_length())


class ShmChannel(Channel):
    kind = "shm"
    family = socket.AF_UNIX

    def __init__(self, sock: socket.socket, peer: str, max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(sock, peer)
        self.max_bytes = max_bytes
        self.alloc_timeout_s = SEND_TIMEOUT_S
        self._own: dict[int, _Segment] = {}
        self._free: set[int] = set()
        self._own_bytes = 0
        self._next_id = 0
        self._cond = threading.Condition()
        self._peer_segs: dict[int, _Segment] = {}
        self._fds: list[int] = []

    # ---- sending side ----------------------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Buffer:
        seg = self._take(nbytes)
        return Buffer(seg.view[:nbytes], nbytes, seg)

    def _take(self, nbytes: int) -> _Segment:
        size = segment_size(nbytes)
        if size > self.max_bytes:
            raise TransportError(f"shm body of {nbytes} bytes exceeds the link's pool of {self.max_bytes} bytes")
        deadline = time.monotonic() + self.alloc_timeout_s
        with self._cond:
            while True:
                if self.closed:
                    raise TransportError(f"shm link to {self.peer} is closed")
                fits = [self._own[i] for i in self._free if self._own[i].size >= nbytes]
                if fits:
                    seg = min(fits, key=lambda s: s.size)
                    self._free.discard(seg.id)
                    return seg
                while self._own_bytes + size > self.max_bytes and self._free:
                    self._drop(max(self._free, key=lambda i: self._own[i].size))
                if self._own_bytes + size <= self.max_bytes:
                    return self._create(size)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(f"shm pool to {self.peer} exhausted for {self.alloc_timeout_s} s: "
                                         f"{self._own_bytes} bytes in flight, max {self.max_bytes}")
                self._cond.wait(left)

    def _create(self, size: int) -> _Segment:
        seg_id, self._next_id = self._next_id, self._next_id + 1
        fd = os.memfd_create(f"disagg-kv-{seg_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
            np.frombuffer(mm, dtype=np.uint8)[::PAGE] = 0  # fault the pages in now, not during the first transfer
            with self._send_lock:
                self.sock.sendmsg([FRAME.pack(SEGMENT, 0, size, seg_id, 0)],
                                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)
        seg = _Segment(seg_id, size, mm)
        self._own[seg_id] = seg
        self._own_bytes += size
        return seg

    def _drop(self, seg_id: int) -> None:
        seg = self._own.pop(seg_id)
        self._free.discard(seg_id)
        self._own_bytes -= seg.size
        with self._send_lock:
            self.sock.sendall(FRAME.pack(DROP, 0, 0, seg_id, 0))
        seg.close()

    def _send_frame(self, header: bytes, body: Any) -> None:
        if body is None:
            return super()._send_frame(header, None)
        if isinstance(body, Buffer) and isinstance(body.ref, _Segment) and self._own.get(body.ref.id) is body.ref:
            seg, n = body.ref, body.nbytes
        else:
            view = memoryview(body).cast("B")
            n = view.nbytes
            seg = self._take(n)
            seg.view[:n] = view
        with self._send_lock:
            self.sock.sendall(FRAME.pack(DATA, len(header), n, seg.id, 0) + header)

    # ---- receiving side --------------------------------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, view.nbytes
        while got < n:
            k, anc, _, _ = self.sock.recvmsg_into([view[got:]], socket.CMSG_SPACE(16))
            for level, typ, data in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                    self._fds.extend(fds)
            if k == 0:
                raise EOFError
            got += k

    def _read_body(self, nbytes: int, seg: int, off: int) -> tuple[Any, object]:
        s = self._peer_segs.get(seg)
        if s is None or off + nbytes > s.size:
            raise TransportError(f"shm body refers to unknown segment {seg} or overruns it")
        return s.view[off:off + nbytes], seg

    def _release(self, ref: object) -> None:
        try:
            with self._send_lock:
                self.sock.sendall(FRAME.pack(RELEASE, 0, 0, ref, 0))  # type: ignore[arg-type]
        except OSError:
            pass  # the link is going down; the sender's pool dies with it

    def _control(self, ftype: int, header: bytes, nbytes: int, seg: int, off: int) -> None:
        if ftype == RELEASE:
            with self._cond:
                if seg in self._own:
                    self._free.add(seg)
                self._cond.notify_all()
        elif ftype == SEGMENT:
            if not self._fds:
                raise TransportError("shm segment announced without a file descriptor")
            fd = self._fds.pop(0)
            try:
                mm = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            int(np.frombuffer(mm, dtype=np.uint8)[::PAGE].sum())  # map the pages now (read faults)
            self._peer_segs[seg] = _Segment(seg, nbytes, mm)
        elif ftype == DROP:
            s = self._peer_segs.pop(seg, None)
            if s is not None:
                s.close()
        else:
            raise TransportError(f"unexpected shm frame type {ftype}")

    def _cleanup(self) -> None:
        with self._cond:
            self._cond.notify_all()
        for s in (*self._own.values(), *self._peer_segs.values()):
            s.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def listen_shm(secret: bytes, on_connect: Callable[[Channel], None], name: str | None = None) -> Listener:
    """Listen on an abstract Unix socket ``@name`` (default: a random one)."""
    name = name or f"disagg-{os.getpid()}-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + name)
    sock.listen(128)
    return Listener(ShmChannel, secret, on_connect, "@" + name, sock)


def connect_shm(address: str, secret: bytes, timeout_s: float = 10.0) -> Channel:
    if not address.startswith("@"):
        raise ValueError(f"bad shm address {address!r}; expected @NAME")
    return connect_socket(ShmChannel, "\0" + address[1:], secret, address, timeout_s)
