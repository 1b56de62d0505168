"""Global vs per-shard top-K under context parallelism (ulysses:2, 2 gloo processes, tiny random pipelines, 10 steps):
    PYTHONPATH=src python3 benchmarks/cp_topk_probe.py
safe-dit selects the sensitive tokens with one global top-K over the gathered PCSP map (exact against one device);
this probe swaps in a per-shard top-K (each rank its own ceil(keep * N_local) best tokens: equal counts, no padding)
and prints how far it moves the partition and the output from the one-device run."""
import json
import os
import sys
from pathlib import Path

from diffusers import ContextParallelConfig

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.engine.generation import Generation
from safe_dit.engine.partition import select_sensitive
from safe_dit.testing.kits import kit_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import RUNS  # noqa: E402  (tests/helpers.py: importable once tests/ is on sys.path)


def per_shard(self, index):
    self.global_index = index
    if self.parallel is None:
        self.index, self.valid = index, None
        return
    start, stop = self.parallel.local(self.grid[0] * self.grid[1])
    local = select_sensitive(self.sensitivity[:, start:stop], self.config.keep_ratio)  # top-K of this shard only
    self.index, self.valid = local, None
    self.global_index = self.parallel.gather(local + start, 1)

def run(rank, world):
    out = {}
    for name in ("lumina-next", "pixart", "sd3", "flux"):
        kit = kit_for(name)
        pipe = kit.pipeline()
        r = RUNS[name]
        apply_safe_dit(pipe, SafeConfig("safe-core"))
        one = r(pipe, steps=10)
        idx_one = pipe.transformer._safe_dit_handle.runtime.last_index
        dense = (apply_safe_dit(pipe, SafeConfig("dense-fp")), r(pipe, steps=10))[1]
        orig = Generation._localise
        Generation._localise = per_shard
        try:
            apply_safe_dit(pipe, SafeConfig("safe-core", context_parallel=ContextParallelConfig(ulysses_degree=2)))
            sh = r(pipe, steps=10)
            idx = pipe.transformer._safe_dit_handle.runtime.last_index
        finally:
            Generation._localise = orig
        remove_safe_dit(pipe)
        overlap = len(set(idx[0].tolist()) & set(idx_one[0].tolist())) / idx_one.shape[1]
        out[name] = dict(per_shard_vs_global=float((sh - one).abs().max()),
                         global_vs_dense_fp=float((one - dense).abs().max()),
                         overlap=overlap, k=int(idx_one.shape[1]))
    return out


if __name__ == "__main__":
    from safe_dit.testing.parallel import launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(launch(f"{Path(__file__).resolve()}:run", timeout=300), indent=1))
