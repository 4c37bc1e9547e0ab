"""One prepared check of deltatune's CUDA paths, for a machine with GPUs (CI stays on CPU).

    make setup && .venv/bin/python benchmarks/gpu/gpu_check.py          # about 5-7 minutes
    .venv/bin/python benchmarks/gpu/gpu_check.py --cpu-dry-run           # same plumbing, tiny model, CPU

Runs, each as its own process with a time limit (a failure is recorded and the rest still run):
  1. bf16 LoRA SFT of SmolLM2-135M on one GPU, padding-free attention on vs off (tokens/s, loss),
     and with gradient checkpointing, its layer inputs on the GPU vs offloaded to pinned CPU memory
  2. QLoRA (4-bit base) if bitsandbytes imports and this build has a quantization key
  3. full fine-tuning of SmolLM2-135M over all visible GPUs, DDP then FSDP (torchrun; tokens/s of
     the whole job, peak GPU memory of rank 0, final loss)
  4. the 1B-shaped LoRA SFT against peft + HF Trainer (benchmarks/gpu/gpu_lora_sft.py, shortened)
and writes every figure to benchmarks/results/gpu/<date>-gpu-check-<gpu>.md (+ .json). Needs nothing beyond
`make setup`: the training rows are generated here when ../shared/data is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/: the common package
from common import machine  # noqa: E402
BUDGET_S = 7.5 * 60
WORDS = ("river mountain cloud bread lamp garden music paper window stone forest coffee "
         "engine letter market winter silver doctor planet bridge").split()


def alpaca_rows(path: Path, n: int, seed: int = 0) -> Path:
    """Instruction rows of varied length (so padding-free batching has padding to save)."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 120))]
            out.write(json.dumps({"instruction": "Repeat these words in order: " + " ".join(words[:8]),
                                  "input": " ".join(words[8:]), "output": " ".join(words)}) + "\n")
    return path


def tiny_model(root: Path) -> str:
    """--cpu-dry-run: a random 2-layer Llama with the tests' byte tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from byte_tokenizer import tiny_chat_llama

    model, tokenizer = tiny_chat_llama(0)
    path = root / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_config(path: Path, model: str, data: Path, out: Path, method: dict, train: dict,
                 max_length: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "model": model, "task": "causal-lm", "output_dir": str(out), "method": method,
        "data": {"train": str(data), "format": "alpaca", "max_length": max_length},
        "train": {"batch_size": 8, "lr": 2e-4, "log_every": 1, "seed": 0, **train}}))
    return path


class Checks:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work, self.started = args, work, time.monotonic()
        self.results: list[dict] = []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT / "tests"),
                                                                os.environ.get("PYTHONPATH")]))}

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.started)

    def run(self, name: str, command: list[str], limit: float, env: dict | None = None) -> str | None:
        """Run one check; its stdout, or None (the failure is recorded)."""
        limit = min(limit, self.left())
        if limit < 20:
            self.results.append({"check": name, "status": "skipped: out of time"})
            return None
        print(f"[gpu_check] {name}: {' '.join(command)}", flush=True)
        tick = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT,
                                  env={**self.env, **(env or {})})
        except subprocess.TimeoutExpired:
            self.results.append({"check": name, "status": f"timed out after {limit:.0f} s"})
            return None
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            self.results.append({"check": name, "status": f"failed (rc {done.returncode})",
                                 "error": " | ".join(tail)[-600:]})
            return None
        print(f"[gpu_check]   done in {time.monotonic() - tick:.0f} s", flush=True)
        return done.stdout

    def train(self, name: str, config: Path, overrides: list[str], processes: int, limit: float,
              extra: dict | None = None) -> None:
        out = self.work / name.replace(" ", "-")
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable])
        stdout = self.run(name, [*launcher, "-m", "deltatune.cli", "train", str(config),
                                 f"output_dir={out}", "--overwrite", *overrides], limit)
        if stdout is None:
            return
        summary = json.loads((out / "summary.json").read_text())
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r]
        self.results.append({
            "check": name, "status": "ok", "processes": summary["world_size"],
            "distributed": summary.get("distributed"), "bf16": summary["bf16"],
            "steps": summary["steps"], "tokens_per_s": summary["tokens_per_s"],
            "time_per_step_s": summary["time_per_step_s"],
            "peak_memory_gb_rank0": round(summary["peak_memory_bytes"] / 2**30, 3),
            "peak_memory_kind": summary["peak_memory_kind"],
            "first_loss": round(losses[0], 4) if losses else None,
            "last_loss": round(losses[-1], 4) if losses else None, **(extra or {})})


def quantization_key() -> str | None:
    """The run-config key that loads the base in 4 bits, if this build has one."""
    from deltatune.config.run import valid_keys

    keys = [k for k in valid_keys() if "quant" in k]
    return keys[0] if keys else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="tiny random model on CPU, 2 gloo processes: checks the plumbing only")
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/gpu/<date>-gpu-check-<gpu>.md (a dry run: its temp directory)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    dry = args.cpu_dry_run
    gpus = torch.cuda.device_count()
    if not dry and not gpus:
        sys.exit("gpu_check: no GPU visible (use --cpu-dry-run to check the script on CPU)")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    args.out = args.out or str(work / "gpu-check-dry.md" if dry else machine.result_path(
        "gpu", "gpu-check", kind=machine.gpu_kind(torch.cuda.get_device_name(0)), suffix=".md"))
    checks = Checks(args, work)
    data = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.jsonl"
    if not data.is_file():
        data = alpaca_rows(work / "alpaca.jsonl", 999)
    model = tiny_model(work) if dry else "smollm2-135m"
    steps, length, procs = (3, 128, 2) if dry else (30, 512, gpus)
    bf16 = "false" if dry else "true"
    lora = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    common = [f"train.max_steps={steps}", f"train.bf16={bf16}", "train.warmup_ratio=0"]

    # 1. bf16 + padding-free attention, one device
    lora_cfg = write_config(work / "lora.yaml", model, data, work / "unused", lora, {}, length)
    for padding_free in ("true", "false"):
        checks.train(f"lora bf16 padding_free={padding_free}", lora_cfg,
                     [*common, f"train.padding_free={padding_free}"], 1, 120)
    # 1b. gradient checkpointing with the layer inputs offloaded to pinned CPU memory: the same
    # losses as checkpointing on the device, less GPU memory (train.checkpoint_offload)
    if not dry:
        for offload in ("false", "true"):
            checks.train(f"lora checkpointing offload={offload}", lora_cfg,
                         [*common, "train.gradient_checkpointing=true",
                          f"train.checkpoint_offload={offload}"], 1, 120)
    else:
        checks.results.append({"check": "lora checkpointing offload", "status": "skipped: CUDA only"})
    # 2. QLoRA where it has landed
    key = quantization_key()
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = True
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        have_bnb = False
    if key and have_bnb and not dry:
        checks.train("qlora nf4", lora_cfg, [*common, f"{key}=nf4"], 1, 150)
    else:
        checks.results.append({"check": "qlora", "status": "skipped: " + (
            "no quantization key in this build" if not key else
            "bitsandbytes does not import" if not have_bnb else "not in a CPU dry run")})
    # 3. DDP and FSDP over every visible device (full fine-tuning)
    full_cfg = write_config(work / "full.yaml", model, data, work / "unused", {"name": "full"},
                            {"lr": 2e-5}, length)
    for mode in ("ddp", "fsdp"):
        checks.train(f"full {mode} x{procs}", full_cfg,
                     [*common, f"train.distributed={mode}", "train.save_every=" + str(steps)],
                     procs, 150, {"checkpoint": "sharded" if mode == "fsdp" else "replicated"})
    # 4. the 1B-shaped SFT against peft + HF Trainer
    if dry:
        checks.results.append({"check": "1B-shaped SFT vs peft + HF Trainer",
                               "status": "skipped: not in a CPU dry run (GPU only)"})
    else:
        stdout = checks.run("1B-shaped SFT vs peft + HF Trainer",
                            [sys.executable, str(HERE / "gpu_lora_sft.py"), "--steps", "10",
                             "--warmup", "2", "--repeats", "1", "--tools", "deltatune,peft-trainer"],
                            240, env={"DELTATUNE_SFT_DATA": str(data)})
        if stdout is not None:
            table = [line for line in stdout.splitlines() if line.startswith("|")]
            checks.results.append({"check": "1B-shaped SFT vs peft + HF Trainer", "status": "ok",
                                   "table": table})
    report(args, checks, torch, gpus, dry)


def report(args, checks: Checks, torch, gpus: int, dry: bool) -> None:
    device = "CPU dry run (tiny random Llama, gloo)" if dry else (
        f"{gpus} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    lines = ["# GPU check (benchmarks/gpu/gpu_check.py)", "",
             f"{device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; "
             f"total {time.monotonic() - checks.started:.0f} s", "",
             "| check | status | procs | mode | bf16 | tokens/s | s/step | peak GB (rank 0) | loss first -> last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in checks.results:
        if "tokens_per_s" in r:
            lines.append(f"| {r['check']} | ok | {r['processes']} | {r['distributed'] or '-'} | "
                         f"{r['bf16']} | {r['tokens_per_s']:.0f} | {r['time_per_step_s']:.3f} | "
                         f"{r['peak_memory_gb_rank0']:.2f} ({r['peak_memory_kind']}) | "
                         f"{r['first_loss']} -> {r['last_loss']} |")
        else:
            lines.append(f"| {r['check']} | {r['status']} {r.get('error', '')} | | | | | | | |")
    for r in checks.results:
        if r.get("table"):
            lines += ["", "1B-shaped LoRA SFT (gpu_lora_sft.py, 10 steps, 1 run per tool):", "", *r["table"]]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(checks.results, indent=2) + "\n")
    print(text)
    failed = [r for r in checks.results if not (r["status"] == "ok" or r["status"].startswith("skipped"))]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
