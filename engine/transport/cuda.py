"""CUDA transport: headers over an authenticated TCP link, bodies (CUDA tensors) by NCCL point-to-point.

After the TCP handshake the listening side (rank 0) opens a ``torch.distributed.TCPStore`` on a free port of its
host and sends the port in a setup frame; both sides then build a private two-rank ``ProcessGroupNCCL`` on it (no
global ``init_process_group``, so a worker may hold many links). A DATA frame whose segment field is ``CUDA_BODY``
is followed on the NCCL group by one ``send``/``recv`` of ``nbytes`` uint8; the receiver's body is a CUDA tensor on
its current device. Frames and NCCL operations are issued under the send lock and consumed in order by the reader
thread, so the two streams stay matched.

Raises `TransportError` when CUDA or NCCL is unavailable. Written for GPU machines; not exercised on a CPU-only
host (the tests skip it there).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from engine.transport.auth import TransportError
from engine.transport.channel import DATA, FRAME, Buffer, Channel, Listener
from engine.transport.tcp import TcpChannel, connect_tcp, listen_tcp

CUDA_BODY = 0xFFFFFFFE
SETUP_TIMEOUT_S = 60.0


def _require_cuda():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise TransportError(f"cuda transport needs torch: {e}") from e
    if not torch.cuda.is_available():
        raise TransportError("cuda transport needs a CUDA device; use shm or tcp on this machine")
    if not dist.is_available() or not dist.is_nccl_available():
        raise TransportError("cuda transport needs torch.distributed with NCCL")
    return torch, dist


class CudaChannel(TcpChannel):
    kind = "cuda"
    family = socket.AF_INET

    def __init__(self, sock: socket.socket, peer: str):
        super().__init__(sock, peer)
        self._pg: Any = None
        self._rank = -1

    def setup(self, rank: int) -> None:
        """Build the two-rank NCCL group (rank 0 = the listening side). Blocking; part of connect/accept."""
        torch, dist = _require_cuda()
        host = self.sock.getsockname()[0] if rank == 0 else self.sock.getpeername()[0]
        self.sock.settimeout(SETUP_TIMEOUT_S)
        try:
            if rank == 0:
                store = dist.TCPStore(host, 0, 2, True, timedelta(seconds=SETUP_TIMEOUT_S), wait_for_workers=False)
                self.sock.sendall(FRAME.pack(DATA, 0, store.port, 0, 0))
            else:
                prefix = bytearray(FRAME.size)
                self._recv_into(memoryview(prefix))
                port = FRAME.unpack(prefix)[2]
                store = dist.TCPStore(host, port, 2, False, timedelta(seconds=SETUP_TIMEOUT_S))
        except (OSError, EOFError, RuntimeError) as e:
            raise TransportError(f"cuda link setup with {self.peer} failed: {e}") from e
        finally:
            self.sock.settimeout(None)
        opts = dist.ProcessGroupNCCL.Options()
        self._pg = dist.ProcessGroupNCCL(dist.PrefixStore("disagg-kv", store), rank, 2, opts)
        self._rank, self._device = rank, torch.device("cuda", torch.cuda.current_device())
        self._torch = torch

    def alloc(self, nbytes: int) -> Buffer:
        t = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._device)
        return Buffer(t, nbytes, t)  # type: ignore[arg-type]  # view is a CUDA tensor here

    def _send_frame(self, header: bytes, body: Any) -> None:
        if body is None:
            return super()._send_frame(header, None)
        t = body.ref if isinstance(body, Buffer) else body
        if not (hasattr(t, "is_cuda") and t.is_cuda):
            raise TransportError("cuda transport bodies must be CUDA tensors (use alloc or pass a tensor)")
        flat = t.contiguous().view(self._torch.uint8).reshape(-1)
        with self._send_lock:
            self.sock.sendall(FRAME.pack(DATA, len(header), flat.numel(), CUDA_BODY, 0) + header)
            self._pg.send([flat], 1 - self._rank, 0).wait()

    def _read_body(self, nbytes: int, seg: int, off: int) -> tuple[Any, object]:
        if seg != CUDA_BODY:
            return super()._read_body(nbytes, seg, off)
        t = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._device)
        self._pg.recv([t], 1 - self._rank, 0).wait()
        self._torch.cuda.current_stream().synchronize()
        return t, None

    def _cleanup(self) -> None:
        self._pg = None


def listen_cuda(secret: bytes, on_connect: Callable[[Channel], None], host: str = "127.0.0.1", port: int = 0) -> Listener:
    _require_cuda()

    def accept(ch: Channel) -> None:
        ch.setup(0)  # type: ignore[attr-defined]
        on_connect(ch)
    return listen_tcp(secret, accept, host, port, channel_cls=CudaChannel)


def connect_cuda(address: str, secret: bytes, timeout_s: float = 10.0) -> Channel:
    _require_cuda()
    ch = connect_tcp(address, secret, timeout_s, channel_cls=CudaChannel)
    ch.setup(1)  # type: ignore[attr-defined]
    return ch
