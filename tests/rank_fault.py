"""Run `deltatune ...` (under torchrun) with one rank that dies: rank RANK SIGKILLs itself right
after checkpoint STEP is complete, as an out-of-memory kill or a lost machine would end it.

    torchrun --nproc_per_node=2 tests/rank_fault.py RANK STEP -- train run.yaml output_dir=...

Reached only by wrapping the loop's own `_checkpoint` from outside; no library code knows it.
"""
from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    rank, step, separator, *command = argv
    assert separator == "--", "usage: rank_fault.py RANK STEP -- deltatune args"
    import deltatune.training.loop as loop

    real = loop._checkpoint

    def checkpoint(run) -> None:
        real(run)
        if run.dist.rank == int(rank) and run.progress.step == int(step):
            os.kill(os.getpid(), signal.SIGKILL)

    loop._checkpoint = checkpoint
    from deltatune.cli import main as deltatune_main

    return deltatune_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
