"""Run `deltatune ...` in this process with one fault armed, for tests that kill it from outside.

    python tests/fault_driver.py FAULT:STEP READY_FILE -- train run.yaml output_dir=... train.save_every=1

FAULT says where the process freezes (writes READY_FILE, then sleeps until the test SIGKILLs it):
    after-save   right after checkpoint STEP is complete
    in-step      inside the forward pass of the step after checkpoint STEP
    in-weights   halfway through writing checkpoint STEP's adapter_model.safetensors
    in-state     halfway through writing checkpoint STEP's trainer_state.pt
    none         no fault (a plain `deltatune` process)
The freeze points are only reached by patching functions the trainer calls; no library code
knows about this driver. Tests call `kill_at(...)`, which runs this file and does the killing.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def freeze(ready: Path) -> None:
    ready.write_text(str(os.getpid()))
    while True:  # until SIGKILL
        time.sleep(1)


def half_write(path, data: bytes, ready: Path) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    freeze(ready)


def arm(fault: str, step: int, ready: Path) -> None:
    import deltatune.adapters_io as adapters_io
    import deltatune.training.loop as train
    import torch

    def in_checkpoint(path) -> bool:  # checkpoint STEP is written to checkpoints/.step-STEP.tmp-*/
        return f"/.step-{step}.tmp-" in str(path)

    if fault in ("after-save", "in-step"):
        real_save, real_loss = train.save_checkpoint, train.batch_loss
        saved = {"step": None}

        def save_checkpoint(run_dir, at_step, *args, **kwargs):
            result = real_save(run_dir, at_step, *args, **kwargs)
            saved["step"] = at_step
            if fault == "after-save" and at_step == step:
                freeze(ready)
            return result

        def batch_loss(*args, **kwargs):
            if fault == "in-step" and saved["step"] == step:
                freeze(ready)
            return real_loss(*args, **kwargs)

        train.save_checkpoint, train.batch_loss = save_checkpoint, batch_loss
    elif fault == "in-weights":
        from safetensors.torch import save

        real_save_file = adapters_io.save_file

        def save_file(tensors, filename, metadata=None):
            if in_checkpoint(filename):
                half_write(filename, save(tensors, metadata=metadata), ready)
            return real_save_file(tensors, filename, metadata=metadata)

        adapters_io.save_file = save_file
    elif fault == "in-state":
        real_torch_save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and in_checkpoint(f):
                buffer = io.BytesIO()
                real_torch_save(obj, buffer, *args, **kwargs)
                half_write(f, buffer.getvalue(), ready)
            return real_torch_save(obj, f, *args, **kwargs)

        torch.save = torch_save
    elif fault != "none":
        raise SystemExit(f"unknown fault {fault!r}")


def kill_at(config: Path, out: Path, fault: str, step: int, tmp_path: Path,
            extra: list[str]) -> None:
    """Start `deltatune train` with the fault armed, wait until it freezes there, SIGKILL it."""
    ready = tmp_path / "ready"
    command = [sys.executable, __file__, f"{fault}:{step}", str(ready), "--",
               "train", str(config), f"output_dir={out}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the fault (rc {process.returncode}): "
                                 f"{process.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "the run never reached the fault"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def main(argv: list[str]) -> int:
    fault_spec, ready, separator, *command = argv
    assert separator == "--", "usage: fault_driver.py FAULT:STEP READY_FILE -- deltatune args"
    fault, _, step = fault_spec.partition(":")
    arm(fault, int(step or 0), Path(ready))
    from deltatune.cli import main as deltatune_main

    return deltatune_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
