"""Sharded training (torch FSDP2, 2 CPU processes on gloo, tiny Llama): the same run as one
process with the same global batch, for full fine-tuning and LoRA; DDP and FSDP agree; a killed
rank ends the job in one line and `--resume` from the sharded checkpoint ends bit-identical
(2 processes) or resharded into 1 process; two torchrun "nodes" on 127.0.0.1 train together;
a live run's directory is locked."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.training.loop import train_from_config
from deltatune.training.run_dir import partial_dir
from tiny_runs import causal_config, classification_config, tiny_bert_dir, tiny_llama_dir, write_config
from tiny_runs import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = os.path.dirname(__file__)
# grad_accum 2 (no gradient sync on the first micro-batch), clipping that bites (max norm 0.05 is
# below every step's norm here), evaluation every 2 steps (lockstep forward passes, `best`).
TRAIN = ["train.max_steps=4", "train.grad_accum=2", "train.eval_every=2", "train.save_every=2",
         "train.max_grad_norm=0.05", "train.keep_checkpoints=5"]


def env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def torchrun(*args: str, script: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *(script or ["-m", "deltatune.cli"]), *args]
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)


def weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(run / name))


def assert_close(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a and a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=1e-4), (key, float((a[key] - b[key]).abs().max()))


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    lora = causal_config(root / "cfg", tiny_llama_dir(root), rows=16)
    full = write_config(root / "cfg" / "full.yaml", {
        **__import__("yaml").safe_load(lora.read_text()), "method": {"name": "full"}})
    one = {}
    for name, config in (("lora", lora), ("full", full)):
        one[name] = root / f"one-{name}"
        train_from_config(str(config), [f"output_dir={one[name]}", *TRAIN,
                                        *(["train.lr=1e-3"] if name == "full" else [])])
    return root, {"lora": lora, "full": full}, one


def fsdp_run(configs, method: str) -> Path:
    """The uninterrupted 2-process FSDP run of `method` (run once, shared by the tests)."""
    root, config, _ = configs
    out = root / f"fsdp-{method}"
    if not out.exists():
        lr = ["train.lr=1e-3"] if method == "full" else []
        result = torchrun("train", str(config[method]), f"output_dir={out}", "train.distributed=fsdp",
                          *TRAIN, *lr)
        assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_matches_one_process(configs, method):
    root, config, one = configs
    out = fsdp_run(configs, method)
    lr = ["train.lr=1e-3"] if method == "full" else []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"] == "fsdp" and summary["world_size"] == 2 and summary["steps"] == 4
    a, b = weights(one[method]), weights(out)
    assert_close(a, b)
    reference = load_file(str(Path(config[method]).parent.parent / "tiny-llama" / "model.safetensors"))
    moved = [k for k in a if k in reference and not torch.equal(a[k], reference[k])]
    assert moved or any("lora_B" in k and a[k].abs().max() > 1e-4 for k in a)  # it trained
    assert all(abs(x - y) < 1e-4 for x, y in zip(losses(one[method]), losses(out)))
    # Sharded checkpoints: one file per rank plus the metadata, and the trainer state.
    shards = sorted(p.name for p in (out / "checkpoints" / "step-4" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (out / "best").is_dir() and json.loads((out / "config.json").read_text() if method == "full"
                                                   else '{"architectures": ["LlamaForCausalLM"]}')["architectures"] == ["LlamaForCausalLM"]
    if method == "full":  # and DDP, same run: the same weights
        ddp = root / "ddp-full"
        result = torchrun("train", str(config[method]), f"output_dir={ddp}", "train.distributed=ddp", *TRAIN, *lr)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((ddp / "summary.json").read_text())["distributed"] == "ddp"
        assert_close(weights(ddp), b)


def test_killed_rank_then_resume(configs, tmp_path):
    root, config, one = configs
    out = tmp_path / "killed"
    result = torchrun("train", str(config["lora"]), f"output_dir={out}", "train.distributed=fsdp", *TRAIN,
                      script=[os.path.join(TESTS, "rank_fault.py"), "1", "2", "--"])
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("deltatune: error: rank 0:")]
    assert len(ours) == 1 and "rank 1 (pid" in ours[0] and "--resume" in ours[0], result.stderr[-3000:]
    partial = partial_dir(out)
    assert not out.exists() and sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["step-2"]
    one_process = tmp_path / "one-process"
    shutil.copytree(partial, partial_dir(one_process))
    # Same world size: bit for bit the uninterrupted FSDP run.
    result = torchrun("train", str(config["lora"]), f"output_dir={out}", "train.distributed=fsdp", *TRAIN, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = fsdp_run(configs, "lora")
    a, b = weights(uninterrupted), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # 2 processes -> 1: the shards are read back whole.
    assert main(["train", str(config["lora"]), f"output_dir={one_process}", *TRAIN, "--resume"]) == 0
    assert_close(weights(one_process), a)
    assert_close(weights(one_process), weights(one["lora"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine(configs):
    """Two torchrun launchers (one process each) meet at a c10d rendezvous on 127.0.0.1."""
    root, config, one = configs
    out = root / "two-nodes"
    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=deltatune-test",
              "-m", "deltatune.cli", "train", str(config["lora"]), f"output_dir={out}",
              "train.distributed=fsdp", *TRAIN]
    nodes = [subprocess.Popen(launch, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), results[0][1][-2000:] + results[1][1][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed"] == "fsdp"
    assert_close(weights(out), weights(one["lora"]))


def test_a_live_run_holds_its_directory(tmp_path, capsys):
    """A second `train --resume` while the first process still runs is refused naming its pid;
    once that process is gone, the same command resumes."""
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=24, max_steps=4,
                                   batch_size=4)
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    command = [sys.executable, os.path.join(TESTS, "fault_driver.py"), "after-save:2", str(ready), "--",
               "train", str(config), f"output_dir={out}", "train.save_every=1"]
    process = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        import time

        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
            time.sleep(0.05)
        capsys.readouterr()
        assert main(["train", str(config), f"output_dir={out}", "--resume"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"pid {process.pid}" in error[0], error
        assert main(["train", str(config), f"output_dir={out}", "--overwrite"]) == 2
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    assert main(["train", str(config), f"output_dir={out}", "train.save_every=1", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_plan_per_process(configs, capsys):
    """`plan --world-size 2`: FSDP divides the weights, gradients and AdamW moments that full
    fine-tuning holds (and the loaded base, for every method); DDP adds its gradient buckets."""
    from deltatune.compare.plan import plan_from_config

    root, config, _ = configs
    one, ddp, fsdp = (
        {p["method"]: p for p in plan_from_config(str(config["full"]), [], "full,lora", n, mode)}
        for n, mode in ((1, "ddp"), (2, "ddp"), (2, "fsdp")))
    assert "per process, 2 processes, fsdp" in capsys.readouterr().out
    full = one["full"]
    assert fsdp["full"]["optimizer_bytes"] == full["optimizer_bytes"] // 2
    assert fsdp["full"]["gradient_bytes"] == full["gradient_bytes"] // 2
    assert ddp["full"]["optimizer_bytes"] == full["optimizer_bytes"]
    assert ddp["full"]["activation_bytes"] == fsdp["full"]["activation_bytes"] == full["activation_bytes"] // 2
    assert fsdp["lora"]["optimizer_bytes"] == one["lora"]["optimizer_bytes"] // 2
    assert main(["plan", str(config["full"]), "--world-size", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_a_rank_gives_back_the_checkpoint_and_freed_blocks(tmp_path):
    """Per-rank memory (benchmarks/memory/fsdp_memory.py): after sharding no rank keeps the loaded
    checkpoint mapped, and activation-sized blocks freed mid-step leave the RSS."""
    result = torchrun(tiny_llama_dir(tmp_path), script=[os.path.join(TESTS, "fsdp_release.py")], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: ok," in result.stdout and "rank 1: ok," in result.stdout, result.stdout
