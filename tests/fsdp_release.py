"""What an fsdp rank gives back on CPU (run under torchrun by tests/test_fsdp.py):

    torchrun --nproc_per_node=2 tests/fsdp_release.py MODEL_DIR

1. The checkpoint file that the model was loaded from (memory-mapped by transformers) is no
   longer mapped once fully_shard has replaced every loaded tensor by this rank's shard: its
   pages would otherwise count in every rank's RSS.
2. Freed activation-sized blocks (256 KiB, interleaved with live ones, as a step's tensors are)
   go back to the OS instead of staying in glibc's heap.
Prints one "rank R: ok ..." line or exits 1 with what was found.
"""
from __future__ import annotations

import gc
import sys


def mappings(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(name))


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def main(model_dir: str) -> int:
    import torch

    from deltatune.models import load_model
    from deltatune.training.distributed import setup_distributed, teardown_distributed
    from deltatune.training.sharding import build_parallel

    dist = setup_distributed()
    model, _ = load_model(model_dir)
    before = mappings("model.safetensors")
    parallel = build_parallel(model, dist, "fsdp", bf16=False)
    gc.collect()
    after = mappings("model.safetensors")
    # a step's tensors: live ones and freed ones interleaved; the freed half must leave the RSS
    pairs = [(torch.ones(64 * 1024), torch.ones(64 * 1024)) for _ in range(200)]
    freed = sum(a.numel() * a.element_size() for a, _ in pairs)
    held = rss_bytes()
    kept = [b for _, b in pairs]
    del pairs
    gc.collect()
    returned = held - rss_bytes()
    teardown_distributed(dist)
    if before == 0 or after != 0 or returned < 0.8 * freed:
        print(f"rank {dist.rank}: checkpoint mappings before/after sharding {before}/{after}; "
              f"freed {freed >> 20} MiB, RSS fell {returned >> 20} MiB", file=sys.stderr)
        return 1
    print(f"rank {dist.rank}: ok, mapping released, {returned >> 20} of {freed >> 20} MiB returned "
          f"({len(kept)} blocks still live; {type(parallel).__name__})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
