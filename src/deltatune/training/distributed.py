"""One process or many: the same training code runs alone or under `torchrun --nproc_per_node=N`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we then join a process group (gloo on CPU, nccl on
GPU). `batch_size` stays the *global* batch: each rank takes every world_size-th row of it, so a
run gives the same updates (within float tolerance) on any number of processes.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist

from deltatune.errors import DeltatuneError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # Sharded (FSDP) model: every forward pass is a collective, so all ranks must run the same
    # number of them (evaluation pads the ranks with fewer batches; generation runs synced).
    lockstep: bool = False
    peers: tuple[tuple[str, int], ...] = ()  # (host, pid) of every rank: to name one that dies

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (one element when alone)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def shard(self, rows: list[int]) -> list[int]:
        """This rank's part of a global batch (every world_size-th row)."""
        return rows[self.rank::self.world_size]


def setup_distributed() -> Distributed:
    """Join the process group torchrun describes; a plain process gets a 1-rank Distributed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size <= 1:
        return Distributed(device=device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            torch_dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise DeltatuneError(f"cannot join the torchrun process group ({backend}): "
                                 f"{str(exc).splitlines()[0]}") from None
    dist = Distributed(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                       local_rank=local_rank, device=device)
    peers = tuple(tuple(p) for p in dist.gather((socket.gethostname(), os.getpid())))
    return Distributed(rank=dist.rank, world_size=dist.world_size, local_rank=local_rank,
                       device=device, peers=peers)


class _Terminated(Exception):
    """torchrun's SIGTERM: it stops the other workers as soon as one of them has ended."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


@contextlib.contextmanager
def peer_failures(dist: Distributed, run_dir: Path) -> Iterator[None]:
    """A rank that dies ends the job with one line naming it, from each surviving rank: whether
    this rank first sees the broken connection (a failed collective) or torchrun's SIGTERM.
    What the run wrote stays consistent: checkpoints are renamed into place only when complete,
    so `--resume` continues from the last one."""
    handler = None
    if dist.enabled and threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    except (RuntimeError, ValueError, _Terminated) as exc:
        if not dist.enabled or isinstance(exc, DeltatuneError) or not (
                isinstance(exc, _Terminated) or _is_peer_loss(exc)):
            raise
        if handler is not None:  # the line below must get out before a second SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            handler = None
        dead = _dead_peers(dist)
        who = " and ".join(dead) if dead else "another rank"
        how = ("torchrun stopped this rank" if isinstance(exc, _Terminated)
               else str(exc).strip().splitlines()[0][:100])
        raise DeltatuneError(f"rank {dist.rank}: {who} ended unexpectedly, so the job stops; "
                             f"complete checkpoints are kept in {run_dir} — rerun with --resume "
                             f"({how})") from None
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def _dead_peers(dist: Distributed, wait_s: float = 3.0) -> list[str]:
    """Peers on this machine whose process is gone. A killed process closes its sockets a moment
    before it becomes a zombie, so look again for a few seconds before giving up."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        dead = [f"rank {r} (pid {pid})" for r, (host, pid) in enumerate(dist.peers)
                if r != dist.rank and host == socket.gethostname() and not _alive(pid)]
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.1)


def _is_peer_loss(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch_dist.DistBackendError) or any(
        word in text for word in ("connection", "broken pipe", "peer", "gloo", "nccl", "timed out"))


def _alive(pid: int) -> bool:
    """A killed worker stays a zombie until torchrun reaps it: that counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir()
    return state not in ("Z", "X")


def teardown_distributed(dist: Distributed, wait: bool = True) -> None:
    """Leave the process group. `wait`: first let every peer finish (gloo aborts a peer that is
    still sending to a closed socket); skipped after an error, when peers may never arrive."""
    if dist.enabled and torch_dist.is_initialized():
        try:
            if wait:
                torch_dist.barrier()
        finally:
            torch_dist.destroy_process_group()


def ranks_in_sync(trainable: list[torch.Tensor], dist: Distributed) -> bool | None:
    """DDP keeps every rank's weights bit-identical; check it (cheaply) instead of assuming it."""
    if not dist.enabled:
        return None
    with torch.no_grad():
        checksum = [float(p.double().sum()) for p in trainable] + \
                   [float(p.double().square().sum()) for p in trainable]
    sums = dist.gather(checksum)
    if any(s != sums[0] for s in sums):
        raise DeltatuneError("distributed training diverged: the ranks' weights differ at the end")
    return True
