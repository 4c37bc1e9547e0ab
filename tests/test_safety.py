"""Output safety and load safety.

- A run writes into a hidden `.NAME.partial/` directory and is renamed to output_dir only when
  complete; an existing output_dir is never replaced without --overwrite, and even with it the
  old one stays intact until the new run is complete (a SIGKILL midway loses nothing).
- Loading never executes code: adapters, full models and checkpoints are read as safetensors +
  JSON, and the one torch.load (optimizer state) uses weights_only=True. Malicious pickles planted
  where weights or trainer state belong are refused, and the code in them never runs.
"""
from __future__ import annotations

import ast
import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.training.checkpoints import STATE_FILE, checkpoint_dirs, latest_checkpoint
from deltatune.cli import main
from deltatune.training.run_dir import partial_dir
from deltatune.training.loop import train_from_config
from fault_driver import kill_at
from tiny_runs import classification_config, tiny_bert_dir

SRC = Path(dt.__file__).parent


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    config = classification_config(root / "cfg", tiny_bert_dir(root), rows=16, max_steps=4,
                                   batch_size=4, save_every=1)
    finished = root / "finished"
    train_from_config(str(config), [f"output_dir={finished}"])
    return root, config, finished


# ----------------------------------------------------------------------------- output safety
def test_a_run_is_published_only_when_complete(run_setup, tmp_path):
    _, config, _ = run_setup
    out = tmp_path / "run"
    seen = []

    def on_step(step: int) -> None:  # while training: nothing at output_dir, all in .run.partial
        seen.append((out.exists(), sorted(p.name for p in partial_dir(out).iterdir())))

    train_from_config(str(config), [f"output_dir={out}"], on_step=on_step)
    assert len(seen) == 4 and all(not exists for exists, _ in seen)
    assert all({"config.yaml", "checkpoints", "metrics.jsonl"} <= set(names) for _, names in seen)
    assert "summary.json" not in seen[-1][1]
    assert not partial_dir(out).exists()
    assert {"summary.json", "adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in out.iterdir()}


def test_an_existing_run_is_refused_without_overwrite_and_untouched(run_setup, capsys):
    _, config, finished = run_setup
    before = snapshot(finished)
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={finished}", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert snapshot(finished) == before
    assert not partial_dir(finished).exists()


def test_overwrite_killed_midway_keeps_the_old_run_intact(run_setup, tmp_path):
    root, config, finished = run_setup
    old = tmp_path / "old"
    shutil.copytree(finished, old)
    before = snapshot(old)
    # A real `deltatune train --overwrite` process, SIGKILLed after its second checkpoint.
    kill_at(config, old, "after-save", 2, tmp_path, extra=["train.lr=0.5", "--overwrite"])
    assert snapshot(old) == before, "the old run changed before the new one was complete"
    assert latest_checkpoint(partial_dir(old)).name == "step-2"
    # Completing the overwrite replaces it whole (and only then).
    assert main(["train", str(config), f"output_dir={old}", "--overwrite", "train.lr=0.5"]) == 0
    assert snapshot(old) != before and not partial_dir(old).exists()
    assert "lr: 0.5" in (old / "config.yaml").read_text()


# ----------------------------------------------------------------------------- load safety
class Payload:
    """Unpickling this runs `touch MARKER`: the test fails if the marker ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"lora_A": Payload(marker)})


def malicious_torch_file(path: Path, marker: Path) -> None:
    torch.save({"optimizer": Payload(marker), "weights": torch.ones(2)}, path)


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """The check below can fail: plain pickle.loads does create the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(malicious_pickle(marker))
    assert marker.exists()


@pytest.fixture
def adapter_dir(tmp_path):
    from conftest import tiny_llama

    model = dt.apply(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    return dt.save_adapter(model, tmp_path / "adapter")


def plant(kind: str, directory: Path, marker: Path) -> None:
    weights = directory / "adapter_model.safetensors"
    if kind == "bin-beside-config":         # PEFT's legacy pickled weights, no safetensors
        weights.unlink()
        (directory / "adapter_model.bin").write_bytes(malicious_pickle(marker))
    elif kind == "pickle-named-safetensors":  # a pickle under the safetensors name
        weights.write_bytes(malicious_pickle(marker))
    elif kind == "torch-zip-named-safetensors":
        malicious_torch_file(weights, marker)
    elif kind == "full-model-bin":           # a "full model" directory with only pickled weights
        (directory / "adapter_config.json").unlink()
        weights.unlink()
        (directory / "config.json").write_text('{"model_type": "llama"}')
        malicious_torch_file(directory / "pytorch_model.bin", marker)


PLANTS = ["bin-beside-config", "pickle-named-safetensors", "torch-zip-named-safetensors", "full-model-bin"]


@pytest.mark.parametrize("kind", PLANTS)
def test_malicious_pickle_in_an_adapter_is_refused_without_running(kind, adapter_dir, tmp_path, capsys):
    from conftest import tiny_llama

    marker = tmp_path / "pwned"
    plant(kind, adapter_dir, marker)
    with pytest.raises(dt.DeltatuneError, match="pickle|corrupt or truncated safetensors"):
        dt.load_adapter(tiny_llama(), adapter_dir)
    capsys.readouterr()
    assert main(["inspect", str(adapter_dir)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not marker.exists()


def test_malicious_trainer_state_in_a_checkpoint_is_refused_without_running(run_setup, tmp_path, capsys):
    _, config, _ = run_setup
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        train_from_config(str(config), [f"output_dir={out}"], on_step=stop_at_3)
    checkpoints = checkpoint_dirs(partial_dir(out))  # oldest first
    assert [c.name for c in checkpoints] == ["step-2", "step-3"]
    marker = tmp_path / "pwned"
    # Only the newest is poisoned: resume refuses it (without running it) and uses step-2.
    malicious_torch_file(checkpoints[-1] / STATE_FILE, marker)
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}", "--resume", "train.max_steps=3"]) == 0
    said = capsys.readouterr().out
    assert f"{checkpoints[-1] / STATE_FILE}: unreadable checkpoint state" in said
    assert "resuming from step-2" in said
    assert not marker.exists()
    # Every checkpoint poisoned (state or adapter): one line, exit 2, and still nothing runs.
    out = tmp_path / "run2"
    with pytest.raises(Stop):
        train_from_config(str(config), [f"output_dir={out}"], on_step=stop_at_3)
    older, newest = checkpoint_dirs(partial_dir(out))
    malicious_torch_file(newest / STATE_FILE, marker)
    (older / "adapter" / "adapter_model.safetensors").unlink()
    (older / "adapter" / "adapter_model.bin").write_bytes(malicious_pickle(marker))
    assert main(["train", str(config), f"output_dir={out}", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{newest / STATE_FILE}: unreadable checkpoint state" in err
    assert not marker.exists()


def test_no_unsafe_deserialisation_anywhere_in_the_library():
    """Every torch.load passes weights_only=True; nothing imports pickle-based loaders."""
    loads = 0
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "joblib", "cloudpickle"} & set(names), f"{path}: {names}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch":
                loads += 1
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert flags.get("weights_only") is True, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert loads >= 1  # the checkpoint's optimizer state
