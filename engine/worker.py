"""Worker processes: the entry point (``python -m engine.worker SPEC.json``) and the plumbing all roles share.

A worker owns one `ModelRunner` (one torch thread by default) and listens on a control address (TCP, 127.0.0.1)
for the router. Roles: ``prefill`` (`engine.prefill_worker`), ``decode`` and ``colocated``
(`engine.decode_worker`). The launcher (`engine.cluster`) writes the spec, passes the launch secret in
``DISAGG_SECRET``, and waits for the ready file the worker writes once it listens. A worker exits on SIGTERM/SIGINT,
and on its own when its launcher dies (parent watchdog), so no process outlives a run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.messages import Cancel, Query, Stats, Submit, to_worker_decoder
from engine.transport import Channel, TransportError, listen, secret_from_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, written by the launcher as JSON. Sizes in tokens / blocks, as named."""

    name: str
    role: str
    model_dir: str
    num_blocks: int
    block_size: int = 16
    max_batch_size: int = 256
    max_batch_tokens: int = 8192
    chunked_prefill: bool = False
    dtype: str = "bf16"
    device: str = "cpu"
    transport: str = "shm"
    threads: int = 1
    verify_kv: bool = False
    warm_gemm_tokens: int = 2048  # warm the GEMM shapes of forward passes up to this many tokens (0: none)
    queue_limit: int = 4096
    host: str = "127.0.0.1"
    cpu: int = -1  # pin the worker (every thread) to this CPU; -1: leave it to the scheduler
    ready_path: str = ""
    parent_pid: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class WorkerBase:
    """Control link to the router, stats, stop flag. Roles implement `submit`, `cancel`, `stats_values`, `run`."""

    def __init__(self, spec: WorkerSpec, runner: object, secret: bytes):
        self.spec, self.runner, self.secret = spec, runner, secret
        self.name, self.role = spec.name, spec.role
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._router: Channel | None = None
        self.control = listen("tcp", secret, self._on_router, host=spec.host)
        self.kv_address = ""

    # ---- router link -------------------------------------------------------------------------------------------------
    def _on_router(self, ch: Channel) -> None:
        old, self._router = self._router, ch
        if old is not None:
            old.close()
        ch.start(self._on_control, lambda exc: log.info("%s: router link closed (%s)", self.name, exc),
                 decoder=to_worker_decoder.decode, name="router")

    def _on_control(self, msg) -> None:
        m = msg.header
        if isinstance(m, Submit):
            self.submit(m)
        elif isinstance(m, Cancel):
            self.cancel(m.rid)
        elif isinstance(m, Query):
            self.to_router(Stats(m.nonce, self.name, self.role, self.stats_values()))

    def to_router(self, msg: object) -> None:
        """Send to the router; a lost router link is logged (the router treats this worker as dead anyway)."""
        ch = self._router
        if ch is None:
            log.warning("%s: no router link; dropping %s", self.name, type(msg).__name__)
            return
        try:
            ch.send(msg)
        except TransportError as e:
            log.warning("%s: cannot reach the router: %s", self.name, e)

    def kv_stats(self) -> dict[str, float]:
        alloc = self.runner.cache.allocator  # type: ignore[attr-defined]
        return {"kv_capacity_blocks": alloc.num_blocks, "kv_free_blocks": alloc.num_free_blocks,
                "kv_used_blocks": alloc.num_blocks - alloc.num_free_blocks}

    # ---- role interface ----------------------------------------------------------------------------------------------
    def submit(self, m: Submit) -> None:
        raise NotImplementedError

    def cancel(self, rid: int) -> None:
        raise NotImplementedError

    def stats_values(self) -> dict[str, float]:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
        self.control.close()
        if self._router is not None:
            self._router.close()


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if parent_pid and os.getppid() != parent_pid:
            log.error("launcher %d is gone; exiting", parent_pid)
            os._exit(3)


def build_worker(spec: WorkerSpec, secret: bytes) -> WorkerBase:
    """Load the model and construct the role's worker (listening, not yet running)."""
    import torch

    from engine.model.runner import ModelRunner

    torch.set_num_threads(spec.threads)
    runner = ModelRunner.from_folder(spec.model_dir, spec.num_blocks, spec.block_size, device=spec.device,
                                     dtype=spec.dtype)
    _warm_up(runner)
    if spec.warm_gemm_tokens:
        up_to = spec.max_batch_tokens if spec.role != "decode" else spec.max_batch_size
        warm_gemm_shapes(runner, min(up_to, spec.warm_gemm_tokens))
    from engine.step_trace import install

    install(runner, spec.name)
    if spec.role == "prefill":
        from engine.prefill_worker import PrefillWorker
        return PrefillWorker(spec, runner, secret)
    if spec.role in ("decode", "colocated"):
        from engine.decode_worker import DecodeWorker
        return DecodeWorker(spec, runner, secret)
    raise ValueError(f"unknown worker role {spec.role!r}")


def warm_gemm_shapes(runner, up_to: int) -> int:
    """Run one forward pass per `engine.model.llama.gemm_rows` bucket up to ``up_to`` tokens (capped by the model's
    context and the free KV cache), so that serving never pays oneDNN's first-time kernel build for those shapes
    (measured: a fresh bf16 shape 1.4x slower, 1.06x after this warm-up; ~4 s for the ~80 buckets up to 2048
    tokens of the tiny model on this CPU). Returns the number of shapes run. CPU only (no-op elsewhere)."""
    from engine.model.llama import gemm_rows
    from engine.model.runner import Sequence

    if not getattr(runner.model, "pad_gemm_rows", False):
        return 0
    alloc = runner.cache.allocator
    limit = min(up_to, runner.cfg.max_position_embeddings, alloc.num_free_blocks * alloc.block_size)
    shapes = sorted({gemm_rows(n) for n in range(1, limit + 1)})
    for m in shapes:
        seq = Sequence(-3, [7] * min(m, limit))  # the last bucket may reach past the limit; its padding does not
        try:
            runner.prefill([seq])
        finally:
            runner.free(seq)
    return len(shapes)


def _warm_up(runner) -> None:
    """One small prefill and two decode steps, so the first real request does not pay one-time costs."""
    from engine.model.runner import Sequence

    seqs = [Sequence(-1, [i % 200 for i in range(40)]), Sequence(-2, [7] * 16)]
    try:
        for s, tok in zip(seqs, runner.sample(runner.prefill(seqs), seqs), strict=False):
            s.token_ids.append(tok)
        for _ in range(2):
            for s, tok in zip(seqs, runner.sample(runner.decode(seqs), seqs), strict=False):
                s.token_ids.append(tok)
    except (ValueError, RuntimeError) as e:  # a cache too small to warm up in is not fatal
        log.warning("warm-up skipped: %s", e)
    finally:
        for s in seqs:
            runner.free(s)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("DISAGG_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s %(levelname)s {Path(argv[0]).stem if argv else 'worker'} %(name)s: %(message)s")
    spec = WorkerSpec.from_json(Path(argv[0]).read_text())
    if spec.cpu >= 0:  # before torch starts its threads, which inherit the mask
        os.sched_setaffinity(0, {spec.cpu})
    sys.setswitchinterval(0.0005)  # the link threads (KV pulls, sends) get the GIL within 0.5 ms of a busy step
    worker = build_worker(spec, secret_from_env())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (worker.stop.set(), worker.wake.set()))
    threading.Thread(target=_watch_parent, args=(spec.parent_pid, worker.stop), daemon=True).start()
    if spec.ready_path:
        tmp = Path(spec.ready_path + ".tmp")
        tmp.write_text(json.dumps({"name": spec.name, "role": spec.role, "pid": os.getpid(),
                                   "control": worker.control.address, "kv": worker.kv_address,
                                   "time": time.time()}))
        tmp.replace(spec.ready_path)
    try:
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
