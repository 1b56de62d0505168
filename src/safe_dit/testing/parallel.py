"""Run a function in a few gloo processes on 127.0.0.1, bounded in time: the tests' context-parallel harness.

``launch("path/to/file.py:function", world=2)`` starts ``world`` Python processes (``python -m
safe_dit.testing.parallel``), each of which joins one gloo process group (with a timeout, so a rank that waits
for a collective another rank never reaches fails instead of hanging), calls ``function(rank, world)`` and,
on rank 0, writes its JSON-able return value to a file; ``launch`` returns it. The processes are killed if
they run past ``timeout`` seconds. One launch can run many cases: process start-up dominates on small CPUs.
``SAFE_DIT_CP_DEVICE=cuda`` in the environment: NCCL, one GPU per rank (``benchmarks/run_cp_gpu.sh``).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target: str, world: int = 2, timeout: float = 240.0, group_timeout: float = 90.0) -> dict:
    """Run ``target`` ("file.py:function") in ``world`` gloo processes; rank 0's return value."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   WORLD_SIZE=str(world), SAFE_DIT_GROUP_TIMEOUT=str(group_timeout))
        src = str(Path(__file__).resolve().parents[2])  # the safe_dit package of this checkout
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        logs = [Path(tmp) / f"rank{r}.log" for r in range(world)]
        procs = []
        for rank in range(world):
            with open(logs[rank], "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "safe_dit.testing.parallel", target, str(out)],
                                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                              stdout=log, stderr=subprocess.STDOUT))
        failed = None
        try:
            for rank, p in enumerate(procs):
                if p.wait(timeout=timeout) != 0 and failed is None:
                    failed = rank
        except subprocess.TimeoutExpired:
            failed = "timeout"
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failed is not None or not out.exists():
            tails = "\n".join(f"--- rank {r} ---\n{logs[r].read_text()[-3000:]}" for r in range(world))
            raise RuntimeError(f"parallel run of {target} failed (rank {failed}):\n{tails}")
        return json.loads(out.read_text())


def _load(target: str):
    path, _, name = target.rpartition(":")
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_cp_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def main(target: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=float(os.environ.get("SAFE_DIT_GROUP_TIMEOUT", "90")))
    cuda = os.environ.get("SAFE_DIT_CP_DEVICE", "cpu") == "cuda"  # benchmarks/run_cp_gpu.sh: one GPU per rank, NCCL
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        result = _load(target)(rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
