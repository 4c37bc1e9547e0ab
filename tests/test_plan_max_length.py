"""`deltatune plan --max-length auto --memory M`: the longest batch-1 sequence within M, measured:
a real one-step training run at the planned length fits M (its peak RSS, as compare measures
every run), and one at twice the length does not. Plus the curve's arithmetic and bad budgets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from byte_tokenizer import byte_tokenizer
from tiny_runs import write_config

from deltatune.cli import main
from deltatune.compare.max_length import _through, longest_within, parse_memory
from deltatune.errors import DeltatuneError

ROOT = Path(__file__).resolve().parents[1]


def wide_llama_dir(root: Path) -> Path:
    """A small Llama whose saved activations (~260 KB a token in fp32) outweigh the noise of a
    process's RSS within a few thousand tokens, and whose positions reach far enough."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=16384, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = root / "wide-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def long_text_config(root: Path) -> Path:
    words = "the quick brown fox jumps over the lazy dog while it rains on the plain ".split()
    text = " ".join(words[(7 * k) % len(words)] for k in range(6000))  # ~30k bytes: one long row
    (root / "long.jsonl").write_text(json.dumps({"text": text}) + "\n")
    return write_config(root / "long.yaml", {
        "model": str(wide_llama_dir(root)), "task": "causal-lm",
        "data": {"train": "long.jsonl", "format": "text", "max_length": 512},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "train": {"batch_size": 1, "max_steps": 1, "bf16": False, "lr": 1e-3, "log_every": 1},
        "output_dir": str(root / "runs" / "one-step"),
    })


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *args], capture_output=True,
                          text=True, env=env, cwd=str(ROOT))


def planned(config: Path, memory: str) -> dict:
    done = cli("plan", str(config), "--max-length", "auto", "--memory", memory, "--json",
               "--methods", "lora")
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return record


def one_step_peak(config: Path, length: int, out: Path) -> int:
    done = cli("train", str(config), f"data.max_length={length}", f"output_dir={out}")
    assert done.returncode == 0, done.stderr
    return json.loads((out / "summary.json").read_text())["peak_memory_bytes"]


def test_the_planned_length_trains_within_the_budget_and_its_double_does_not(tmp_path):
    config = long_text_config(tmp_path)
    unlimited = planned(config, "64GB")
    assert unlimited["limited_by"] == "positions" and unlimited["max_length"] == 16384
    # a budget the activations dominate: ~0.55 GB of them above the model and the allowance
    budget_mb = int(unlimited["baseline_mb"] + 250 + 560)
    record = planned(config, f"{budget_mb}MB")
    length = record["max_length"]
    assert record["method"] == "lora" and record["limited_by"] == "memory"
    assert 1000 < length < 8000 and record["peak_mb"] <= budget_mb
    fits = one_step_peak(config, length, tmp_path / "runs" / "at-length")
    double = one_step_peak(config, 2 * length, tmp_path / "runs" / "at-double")
    assert fits <= budget_mb * 2**20 < double, (length, fits / 2**20, double / 2**20, budget_mb)


def test_a_budget_below_the_weights_is_one_line_and_exit_2(tmp_path, capsys):
    config = long_text_config(tmp_path)
    capsys.readouterr()  # what saving the model printed
    assert main(["plan", str(config), "--max-length", "auto", "--memory", "50MB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--memory 50 MB: the model alone needs more" in err
    for bad, flags in (("--memory: expected a size", ["--max-length", "auto", "--memory", "lots"]),
                       ("--max-length: only auto", ["--max-length", "4096"]),
                       ("--memory: goes with --max-length auto", ["--memory", "1GB"])):
        assert main(["plan", str(config), *flags]) == 2
        assert bad in capsys.readouterr().err


def test_memory_sizes_and_the_bisection():
    assert parse_memory("20GB") == 20 * 2**30 and parse_memory("512 mb") == 512 * 2**20
    assert parse_memory("1.5GiB") == int(1.5 * 2**30) and parse_memory("auto") is None
    for bad in ("-1GB", "0", "20 parsecs", ""):
        with pytest.raises(DeltatuneError, match="--memory"):
            parse_memory(bad)
    quadratic = _through([1, 2, 3], [3 + 2 * 1 + 1, 3 + 2 * 2 + 4, 3 + 2 * 3 + 9])  # 3 + 2x + x²
    assert quadratic(10) == pytest.approx(123)
    peak = lambda n: 100 + 3 * n  # noqa: E731
    assert longest_within(peak, 400, 10**6) == 100
    assert longest_within(peak, 402, 10**6) == 100 and longest_within(peak, 403, 10**6) == 101
    assert longest_within(peak, 50, 10**6) == 0 and longest_within(peak, 10**9, 512) == 512
