"""Measure a transport's one-way transfer time against the same run's in-process memory-copy bandwidth.

`measure` starts a real receiver in a separate process (``python -m engine.transport.bench KIND``), connects to it
with a fresh secret, and sends each size ``repeats`` times, one transfer in flight at a time, after one untimed
warm-up per size. A sample is the time from the sender starting to write the body (for shm: the copy into the shared
segment; for tcp: the ``sendall``) until the receiver has the whole body in memory it can read (its reader thread's
``time.monotonic()`` stamp; the clock is system-wide, so the two processes share it). The receiver acknowledges
each transfer so the next one starts on an idle link; the acknowledgement is not timed.

`memcpy_bandwidth` copies the same number of bytes between two warm buffers in this process: the ceiling a
same-host transfer is compared with. Both run in the same process run so machine noise is shared.

Used by the engine benchmark and by calibration (issue 3); raw samples are returned, nothing is averaged away.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import time
import zlib

import numpy as np

from engine.transport import connect, listen, new_secret

log = logging.getLogger(__name__)


def copy_samples(nbytes: int, repeats: int = 20, working_set_bytes: int = 0) -> list[float]:
    """Seconds per in-process copy of ``nbytes`` (memoryview assignment = memcpy). With ``working_set_bytes`` larger
    than ``nbytes``, successive copies rotate over that many bytes of distinct source and destination buffers, so a
    small copy runs from memory (as a KV copy out of a large cache does) instead of from a hot L2 cache."""
    k = max(1, working_set_bytes // max(nbytes, 1))
    src = np.random.default_rng(0).integers(0, 256, nbytes * k, dtype=np.uint8)
    dst = np.empty_like(src)
    pairs = [(memoryview(dst[i * nbytes:(i + 1) * nbytes]), memoryview(src[i * nbytes:(i + 1) * nbytes]))
             for i in range(k)]
    for d, s in pairs:
        d[:] = s
    out = []
    for r in range(repeats):
        d, s = pairs[r % k]
        t0 = time.perf_counter()
        d[:] = s
        out.append(time.perf_counter() - t0)
    return out


def memcpy_bandwidth(nbytes: int, repeats: int = 20, working_set_bytes: int = 0) -> float:
    """Median bytes/s of a plain same-process copy of ``nbytes`` (the ceiling for same-host transfers); see
    `copy_samples` for ``working_set_bytes`` (0: the same warm buffers every time)."""
    return nbytes / float(np.median(copy_samples(nbytes, repeats, working_set_bytes)))


def measure(kind: str, sizes_bytes: list[int], repeats: int = 10, verify: bool = False,
            timeout_s: float = 60.0) -> list[dict]:
    """Raw one-way transfer samples: one dict per timed transfer with ``kind``, ``nbytes``, ``seconds``,
    ``bytes_per_s``, ``repeat``. With ``verify`` the receiver CRC-checks each body and a mismatch raises
    RuntimeError. Raises `TransportError` if the receiver cannot be started or stops answering within ``timeout_s``.
    """
    from engine.transport.auth import SECRET_ENV, TransportError

    secret = new_secret()
    env = {**os.environ, SECRET_ENV: secret.hex(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.transport.bench", kind], env=env, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    acks: queue.Queue = queue.Queue()
    ch = None
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if not line.startswith("ADDRESS "):
            raise TransportError(f"bench receiver for {kind!r} did not start (exit {proc.poll()})")
        ch = connect(kind, line.split(" ", 1)[1], secret, timeout_s=timeout_s)
        ch.start(lambda m: acks.put(m.header), lambda e: acks.put(None))
        rng = np.random.default_rng(0)
        samples = []
        for nbytes in sizes_bytes:
            src = rng.integers(0, 256, nbytes, dtype=np.uint8)
            crc = zlib.crc32(src) if verify else 0
            fill = _filler(kind, src)
            for rep in range(-1, repeats):
                t0 = time.monotonic()
                buf = ch.alloc(nbytes)
                fill(buf.view)
                ch.send({"crc": crc, "verify": verify}, buf)
                try:
                    ack = acks.get(timeout=timeout_s)
                except queue.Empty:
                    raise TransportError(f"bench receiver did not acknowledge within {timeout_s} s") from None
                if ack is None:
                    raise TransportError("bench receiver closed the link")
                if verify and not ack["ok"]:
                    raise RuntimeError(f"{kind}: body of {nbytes} bytes arrived corrupted (CRC mismatch)")
                if rep >= 0:
                    dt = ack["t_recv"] - t0
                    samples.append({"kind": kind, "nbytes": nbytes, "seconds": dt, "bytes_per_s": nbytes / dt,
                                    "repeat": rep})
        return samples
    finally:
        if ch is not None:
            ch.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _filler(kind: str, src: np.ndarray):
    """How the sender writes ``src`` into a send buffer: a memcpy, or a device copy for cuda (then synchronise)."""
    if kind != "cuda":
        view = memoryview(src)

        def fill(dst) -> None:
            dst[:] = view
        return fill
    import torch

    dev = torch.from_numpy(src).cuda()

    def fill_cuda(dst) -> None:
        dst.copy_(dev)
        torch.cuda.synchronize()
    return fill_cuda


def _crc(body) -> int:
    return zlib.crc32(body.cpu().numpy() if hasattr(body, "cpu") else body)


def _serve(kind: str) -> None:
    """Receiver side: accept one link, acknowledge every message with its arrival stamp, exit when it closes."""
    from engine.transport.auth import secret_from_env

    done = queue.Queue()

    def on_connect(ch):
        def on_msg(m):
            ok = not m.header.get("verify") or _crc(m.body) == m.header["crc"]
            ch.release(m)
            ch.send({"t_recv": m.t_recv, "ok": ok})
        ch.start(on_msg, lambda e: done.put(e))

    lst = listen(kind, secret_from_env(), on_connect)
    print(f"ADDRESS {lst.address}", flush=True)
    try:
        done.get(timeout=3600)
    finally:
        lst.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
