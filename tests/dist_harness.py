"""Run a function on N gloo processes on this CPU machine and collect per-rank results.

    results = run_distributed(fn, world_size=4, args=(a, b))
    # fn(rank, world_size, *args) runs in each process after init_process_group("gloo");
    # results[r] is what rank r returned (saved with torch.save, so tensors are fine).

Processes come from a fork server that has imported torch once (fast, and safe:
forking the pytest process itself can hang a child on the parent's OpenMP
state), with one intra-op thread each, so four ranks fit on a 2-core machine.
``fn`` must be a module-level function (it is pickled).  A failure in any rank re-raises in the
test with that rank's traceback.  Rendezvous goes through a file in a fresh
temporary directory, so tests never fight over ports.
"""
from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, tmp: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    except BaseException:
        (Path(tmp) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results."""
    with tempfile.TemporaryDirectory(prefix="msg-dist-") as tmp:
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if method == "forkserver":
            import multiprocessing
            multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "megatron_msg"])
        ctx = mp.start_processes(_worker, args=(world_size, tmp, fn, args), nprocs=world_size,
                                 join=False, start_method=method)
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    raise TimeoutError(f"distributed run did not finish in {timeout:.0f} s (hang?)")
        except Exception as exc:
            errors = sorted(Path(tmp).glob("rank*.err"))
            detail = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errors)
            raise RuntimeError(f"distributed run failed:\n{detail or exc}") from exc
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

