"""Faults lose nothing: a SIGKILL at a random step (even halfway through writing a checkpoint),
a full disk and a non-finite loss each leave the last complete checkpoint intact, and
`--resume` then ends bit-identical to a run that was never interrupted (CPU, fp32).

The killed runs are real `deltatune train` processes (tests/fault_driver.py freezes one at a
chosen point, the test sends SIGKILL); the resumes and the other faults run in-process.
"""
from __future__ import annotations

import errno
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.training.checkpoints import STATE_FILE, checkpoint_dirs
from deltatune.cli import main
from deltatune.training.run_dir import partial_dir
from deltatune.training.loop import train_from_config
from fault_driver import kill_at
from tiny_runs import classification_config, tiny_bert_dir

STEPS = 8
# LoRA dropout draws from the RNG every step, so a resume that restored the wrong RNG state
# (or the wrong data position, or optimizer moments) cannot end bit-identical.
EXTRA = ["method.dropout=0.1", "train.save_every=1", "train.keep_checkpoints=20"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Bit-identity across processes needs the same intra-op thread count in each (the killed
    subprocesses get OMP_NUM_THREADS=1); one thread is also the fastest for tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT run config and the uninterrupted reference run (every checkpoint kept)."""
    root = tmp_path_factory.mktemp("faults")
    config = classification_config(root / "cfg", tiny_bert_dir(root), rows=24, max_steps=STEPS,
                                   batch_size=4)
    reference = root / "reference"
    summary = train_from_config(str(config), [f"output_dir={reference}", *EXTRA])
    assert summary["steps"] == STEPS
    return config, reference


def final_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def checkpoint_delta(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step}" / "adapter" / "adapter_model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"tensor {key} differs"


def complete_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint_dirs(run_dir)]


def leftovers(run_dir: Path) -> list[str]:
    """Temp directories of interrupted writes (they must not survive into a finished run)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp-" in p.name)


# (fault, seed): the seed draws the step; "in-weights"/"in-state" die with checkpoint STEP
# half-written, so the last complete one is STEP - 1.
KILLS = [("after-save", 0), ("in-step", 1), ("in-weights", 2), ("in-state", 3)]


@pytest.mark.parametrize("fault,seed", KILLS, ids=[f"{f}-seed{s}" for f, s in KILLS])
def test_sigkill_then_resume_is_bit_identical(setup, tmp_path, fault, seed, capsys):
    config, reference = setup
    step = random.Random(seed).randint(2, STEPS - 2)
    out = tmp_path / "run"
    kill_at(config, out, fault, step, tmp_path, EXTRA)

    # Nothing is published until the run completes; the partial directory holds the checkpoints.
    assert not out.exists()
    partial = partial_dir(out)
    last = step if fault in ("after-save", "in-step") else step - 1
    assert complete_steps(partial)[-1] == last
    if fault in ("in-weights", "in-state"):  # the half-written checkpoint is only a temp dir
        assert any(f".step-{step}.tmp-" in name for name in leftovers(partial))
    # The last complete checkpoint is the uninterrupted run's, and it loads on its own.
    assert_bit_identical(checkpoint_delta(partial, last), checkpoint_delta(reference, last))
    model, _ = dt.load_model(str(Path(config).parents[1] / "tiny-bert"), task="classification")
    dt.load_adapter(model, partial / "checkpoints" / f"step-{last}" / "adapter")
    torch.load(partial / "checkpoints" / f"step-{last}" / STATE_FILE, weights_only=True)

    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}", *EXTRA, "--resume"]) == 0
    assert_bit_identical(final_delta(out), final_delta(reference))
    assert not partial.exists() and leftovers(out) == []
    assert complete_steps(out) == list(range(1, STEPS + 1))


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(setup, tmp_path,
                                                                          monkeypatch, capsys):
    config, reference = setup
    step = random.Random(4).randint(2, STEPS - 1)
    out = tmp_path / "run"
    import deltatune.adapters_io as adapters_io

    real_save_file = adapters_io.save_file

    def save_file(tensors, filename, metadata=None):
        if f"/.step-{step}.tmp-" in str(filename):
            with open(filename, "wb") as handle:  # a few bytes land, then the disk is full
                handle.write(b"\0" * 16)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(adapters_io, "save_file", save_file)
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}", *EXTRA]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"step-{step}" in err and "No space left on device" in err and "--resume" in err, err
    partial = partial_dir(out)
    assert not out.exists() and leftovers(partial) == []  # the half-written checkpoint is gone
    assert complete_steps(partial)[-1] == step - 1
    assert_bit_identical(checkpoint_delta(partial, step - 1), checkpoint_delta(reference, step - 1))

    monkeypatch.setattr(adapters_io, "save_file", real_save_file)  # space freed
    assert main(["train", str(config), f"output_dir={out}", *EXTRA, "--resume"]) == 0
    assert_bit_identical(final_delta(out), final_delta(reference))


def inject_inf_at(monkeypatch, step: int) -> None:
    """The loss of optimizer step `step` (1-based; grad_accum 1) becomes inf."""
    import deltatune.training.loop as train

    real = train.batch_loss
    calls = {"n": 0}

    def batch_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls["n"] += 1
        return loss * math.inf if calls["n"] == step else loss

    monkeypatch.setattr(train, "batch_loss", batch_loss)


def test_inf_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup, tmp_path,
                                                                          monkeypatch, capsys):
    config, reference = setup
    step = random.Random(5).randint(2, STEPS - 1)
    inject_inf_at(monkeypatch, step)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}", *EXTRA]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"step {step}: the loss is" in err, err
    assert "train.on_nan=skip" in err
    partial = partial_dir(out)
    assert not out.exists() and complete_steps(partial) == list(range(1, step))
    assert_bit_identical(checkpoint_delta(partial, step - 1), checkpoint_delta(reference, step - 1))


def test_inf_loss_with_on_nan_skip_skips_only_that_step(setup, tmp_path, monkeypatch, capsys):
    config, reference = setup
    step = random.Random(6).randint(2, STEPS - 1)
    inject_inf_at(monkeypatch, step)
    out = tmp_path / "run"
    assert main(["train", str(config), f"output_dir={out}", *EXTRA, "train.on_nan=skip"]) == 0
    assert f"step {step}: non-finite loss, step skipped" in capsys.readouterr().out
    # The skipped step left the delta as it was; the steps before it match the reference.
    assert_bit_identical(checkpoint_delta(out, step), checkpoint_delta(out, step - 1))
    assert_bit_identical(checkpoint_delta(out, step - 1), checkpoint_delta(reference, step - 1))
    assert all(torch.isfinite(t).all() for t in final_delta(out).values())


def test_absurd_learning_rate_stops_at_the_first_non_finite_step(setup, tmp_path, capsys):
    config, _ = setup
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}", *EXTRA, "train.lr=1e30"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    found = re.search(r"step (\d+): the loss is (nan|inf)", err)
    assert found, err
    bad_step = int(found.group(1))
    partial = partial_dir(out)
    assert complete_steps(partial) == list(range(1, bad_step))
    for step in complete_steps(partial):  # every kept checkpoint holds finite numbers only
        assert all(torch.isfinite(t).all() for t in checkpoint_delta(partial, step).values())


def test_full_disk_while_publishing_the_final_delta_keeps_every_checkpoint(setup, tmp_path,
                                                                          monkeypatch, capsys):
    """A write error outside a checkpoint (here: the final adapter) is one line as well, and
    --resume (all steps already done) only publishes the run."""
    config, reference = setup
    out = tmp_path / "run"
    import deltatune.adapters_io as adapters_io

    real_save_file = adapters_io.save_file

    def save_file(tensors, filename, metadata=None):
        if "/..final.tmp-" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(adapters_io, "save_file", save_file)
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}", *EXTRA]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and ".final" in err, err
    assert not out.exists() and complete_steps(partial_dir(out)) == list(range(1, STEPS + 1))
    monkeypatch.setattr(adapters_io, "save_file", real_save_file)
    assert main(["train", str(config), f"output_dir={out}", *EXTRA, "--resume"]) == 0
    assert_bit_identical(final_delta(out), final_delta(reference))
    assert leftovers(out) == [] and not (out / ".final").exists()


def test_a_checkpoint_emptied_by_a_power_loss_is_skipped_on_resume(setup, tmp_path, capsys):
    """A rename can reach the disk before the data does: the newest checkpoint then exists with
    empty files. --resume says so and continues from the one before, still bit-identical."""
    config, reference = setup
    step = random.Random(7).randint(3, STEPS - 1)
    out = tmp_path / "run"

    class PowerLoss(Exception):
        pass

    def lose_power(at: int) -> None:
        if at == step:
            raise PowerLoss()

    with pytest.raises(PowerLoss):
        train_from_config(str(config), [f"output_dir={out}", *EXTRA], on_step=lose_power)
    newest = partial_dir(out) / "checkpoints" / f"step-{step}"
    for name in (STATE_FILE, "adapter/adapter_model.safetensors"):
        (newest / name).write_bytes(b"")
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}", *EXTRA, "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"skipped a damaged checkpoint ({newest}" in said and f"resuming from step-{step - 1}" in said
    assert_bit_identical(final_delta(out), final_delta(reference))
