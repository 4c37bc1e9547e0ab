"""benchmarks/results.json -> benchmarks/RESULTS.md (medians, ratios, targets met or missed)."""
from __future__ import annotations

import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = {"deltatune": "deltatune LoRA", "peft-trainer": "peft + HF Trainer (dynamic padding)",
         "trl": "TRL SFTTrainer (padding_free)", "deltatune-full": "deltatune full fine-tuning",
         "deltatune-frozen-fp32": "deltatune LoRA, frozen weights fp32 (before the lever)",
         "deltatune-before": "deltatune LoRA, the code before this round (53c0504)"}


def machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name"))
    except (StopIteration, OSError):
        cpu = platform.processor() or "unknown CPU"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    amx = "AMX-bf16" if "amx_bf16" in flags else \
        "AVX512-bf16, no AMX" if "avx512_bf16" in flags else "no bf16 matmul units"
    memory = ""
    if Path("/proc/meminfo").exists():
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    import os

    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "transformers", "peft", "trl"))
    return f"{cpu}, {os.cpu_count()} cores ({amx}){memory}; Python {platform.python_version()}, {versions}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _runs(raw: dict, key: str) -> list[dict]:
    return [e["result"] for e in raw.get(key, [])]


def _percent(value: float | None) -> str:
    return "?" if value is None or value != value else f"{100 * value:.1f}%"


def _mfu_note(run: dict) -> list[str]:
    """Which peak the MFU column divides by (benchmarks/common/flops.py counts the model's FLOPs)."""
    if "peak_gflops" not in run:
        return []
    return [f"MFU = model FLOPs (benchmarks/common/flops.py: real tokens, head on labelled positions only) "
            f"per second / this machine's measured {run['precision']} matmul peak, "
            f"{run['peak_gflops']:,.0f} GFLOP/s (`deltatune inspect --hardware`; CPU flags: "
            f"{' '.join(run.get('cpu_flags') or []) or 'none'})."]


def _check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main_section(raw: dict) -> list[str]:
    rows = {tool: _runs(raw, f"main:{tool}") for tool in NAMES}
    rows = {tool: runs for tool, runs in rows.items() if runs}
    if not rows:
        return []
    summary = {tool: {"tps": _median([r["real_tokens_per_s"] for r in runs]),
                      "step": _median([r["step_s_median"] for r in runs]),
                      "rss": _median([r["peak_rss_gb"] for r in runs]),
                      "loss": statistics.mean(r["last_loss_mean"] for r in runs),
                      "each": [r["real_tokens_per_s"] for r in runs],
                      "cpu": [r.get("cpu_utilization") for r in runs],
                      "mfu": _median([r["mfu"] for r in runs if "mfu" in r]),
                      "gflops": _median([r["model_gflops"] for r in runs if "model_gflops" in r])}
               for tool, runs in rows.items()}
    first = next(iter(rows.values()))[0]
    out = ["## LoRA SFT of SmolLM2-135M: deltatune vs peft + HF Trainer vs TRL", "",
           f"{first['steps']} optimizer steps per run, the first {first['warmup']} not measured; "
           f"{len(next(iter(rows.values())))} runs per tool, alternated. Medians over runs.", "",
           "CPU use = the run's CPU seconds / (wall seconds x threads) over the measured steps: "
           "about 1 when it had the cores to itself, lower when other processes competed.", "",
           *_mfu_note(first), "",
           "| tool | real tokens/s (each run) | step median (s) | peak RSS (GB) | "
           "mean loss, last 5 steps | CPU use (each run) | model GFLOP/s | MFU |",
           "|---|---|---|---|---|---|---|---|"]
    for tool, s in summary.items():
        each = ", ".join(f"{v:.0f}" for v in s["each"])
        cpu = ", ".join("?" if c is None else f"{c:.2f}" for c in s["cpu"])
        out.append(f"| {NAMES[tool]} | {s['tps']:.0f} ({each}) | {s['step']:.2f} | {s['rss']:.2f} | "
                   f"{s['loss']:.4f} | {cpu} | {s['gflops']:.0f} | {_percent(s['mfu'])} |")
    ours = summary.get("deltatune")
    peer, trl, full = summary.get("peft-trainer"), summary.get("trl"), summary.get("deltatune-full")
    out += ["", "| target | measured | |", "|---|---|---|"]
    # Timing taken while other processes held the cores says nothing about the tools.
    contended = any(c is not None and c < 0.8 for s in summary.values() for c in s["cpu"])

    def timed(ok: bool) -> str:
        return "not valid: CPU use < 0.8" if contended else _check(ok)

    if ours and peer:
        speed = ours["tps"] / peer["tps"]
        rss = ours["rss"] / peer["rss"]
        loss = abs(ours["loss"] - peer["loss"]) / peer["loss"]
        out += [f"| real tokens/s >= 1.5x peft + HF Trainer | {speed:.2f}x | {timed(speed >= 1.5)} |",
                f"| peak RSS <= 0.7x peft + HF Trainer | {rss:.2f}x | {_check(rss <= 0.7)} |",
                f"| last-steps loss within 2% of peft + HF Trainer | {100 * loss:.2f}% | "
                f"{_check(loss <= 0.02)} |"]
    if ours and trl:
        speed = ours["tps"] / trl["tps"]
        out.append(f"| real tokens/s >= 1.2x TRL's best | {speed:.2f}x | {timed(speed >= 1.2)} |")
    before = summary.get("deltatune-before") or summary.get("deltatune-frozen-fp32")
    if ours and before:
        speed = ours["tps"] / before["tps"]
        out.append(f"| real tokens/s >= 1.2x the LoRA run before this round's levers | {speed:.2f}x | "
                   f"{timed(speed >= 1.2)} |")
    if ours and ours["mfu"] == ours["mfu"]:
        out.append(f"| LoRA SFT MFU >= 75% of the measured peak | {_percent(ours['mfu'])} | "
                   f"{timed(ours['mfu'] >= 0.75)} |")
    if ours and full:
        ratio = ours["step"] / full["step"]
        out.append(f"| LoRA step <= 0.65x full fine-tuning step (deltatune) | {ratio:.2f}x | "
                   f"{timed(ratio <= 0.65)} |")
    return out + [""]


def generate_section(raw: dict) -> list[str]:
    runs = _runs(raw, "generate")
    if not runs:
        return []
    r = runs[-1]
    out = ["## generate() latency, base vs LoRA", "",
           f"Greedy, batch 1, {r['prompt_tokens']} prompt tokens, exactly {r['new_tokens']} new "
           f"tokens, {r['rounds']} rounds alternated (medians). Merged output equals unmerged: "
           f"{r['merged_tokens_equal_unmerged']}.", "",
           *_mfu_note(r), "",
           "| model | median (s) | ratio to base | MFU |", "|---|---|---|---|"]
    for name, median in r["median_s"].items():
        out.append(f"| {name} | {median:.3f} | {r['ratio_to_base'][name]:.3f} | "
                   f"{_percent(r.get('mfu', {}).get(name))} |")
    merged = r["ratio_to_base"]["lora merged"]
    out += ["", f"Target merged <= 1.02x base: {merged:.3f}x, {_check(merged <= 1.02)}. "
            f"Unmerged LoRA overhead: {100 * (r['ratio_to_base']['lora unmerged'] - 1):.1f}%.", ""]
    return out


def _growth(points: list[dict], key: str) -> list[str]:
    """Per doubling of the axis: how much the time per token grew (1.0 = linear in tokens)."""
    notes = []
    for a, b in zip(points, points[1:]):
        grew = a["tokens_per_s"] / b["tokens_per_s"]
        notes.append(f"{a[key]}->{b[key]}: x{grew:.2f}")
    return notes


def _cpu(run: dict) -> str:
    return "?" if run.get("cpu_utilization") is None else f"{run['cpu_utilization']:.2f}"


def scaling_section(raw: dict) -> list[str]:
    out = []
    seq = sorted(_runs(raw, "scaling:seq"), key=lambda r: r["value"])
    if seq:
        out += ["## Scaling: sequence length (LoRA r8, every row full)", "",
                *_mfu_note(seq[0]), "",
                "| tokens per row | rows | step (s) | tokens/s | peak RSS (GB) | CPU use | MFU |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['value']} | {r['batch']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['peak_rss_gb']:.2f} | {_cpu(r)} | {_percent(r.get('mfu'))} |" for r in seq]
        out += ["", "Time per token, row length doubled (1.00 = cost linear in tokens): "
                + "; ".join(_growth(seq, "value")) + ".", ""]
    rank = sorted(_runs(raw, "scaling:rank"), key=lambda r: r["value"])
    if rank:
        out += ["## Scaling: LoRA rank (batch 8 x 512)", "",
                "| rank | step (s) | tokens/s | peak RSS (GB) | CPU use | MFU |", "|---|---|---|---|---|---|"]
        out += [f"| {r['value']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['peak_rss_gb']:.2f} | {_cpu(r)} | {_percent(r.get('mfu'))} |" for r in rank]
        out.append("")
    for method in ("prompt", "prefix"):
        runs = sorted(_runs(raw, f"scaling:{method}"), key=lambda r: r["value"])
        if runs:
            out += [f"## Scaling: {method} tuning, number of virtual tokens (batch 8 x 256)", "",
                    "| virtual tokens | step (s) | real tokens/s | peak RSS (GB) | CPU use | MFU |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['value']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
                    f"{r['peak_rss_gb']:.2f} | {_cpu(r)} | {_percent(r.get('mfu'))} |" for r in runs]
            out.append("")
    return out


def levers_section(raw: dict) -> list[str]:
    runs = raw.get("levers")
    if not runs:
        return []
    return ["## Levers, one at a time (one process, same batches, variants alternated)", "",
            f"`{runs[-1]['command']}`", "", "```", runs[-1]["result"], "```", ""]


def commands_section(raw: dict) -> list[str]:
    out = ["## Exact commands", "", "```"]
    for key, entries in raw.items():
        if isinstance(entries, list):
            out += [e["command"] for e in entries]
    return out + ["```", ""]


def write(raw: dict, notes: str | None = None, out: Path | None = None) -> None:
    settings = raw.get("settings", {})
    notes_file = HERE / "RESULTS-notes.md"
    lines = ["# Benchmark results", "",
             f"Machine: {machine()}. Measured {settings.get('started', '?')} to "
             f"{settings.get('finished', '?')} by `make bench` (benchmarks/training/run.py). Every run held "
             "`/tmp/deltatune-heavy.lock`, so no other locked heavy job overlapped it; other "
             "engineers' work that does not take the lock may still have shared the 2 cores (the "
             "CPU use column shows how much): compare ratios measured side by side rather than "
             "absolute figures.", ""]
    hw = raw.get("hardware")
    if hw:
        lines += [f"Measured matmul peaks (`deltatune inspect --hardware --refresh`, under the lock, "
                  f"{hw['threads']} threads): fp32 {hw['fp32_gflops']:,.0f} GFLOP/s, bf16 "
                  f"{hw['bf16_gflops']:,.0f} GFLOP/s; CPU flags: {' '.join(hw.get('flags') or [])}; "
                  f"`bf16: auto` picks {'bf16' if hw['bf16_auto'] else 'fp32'}.", ""]
    lines += main_section(raw) + generate_section(raw) + scaling_section(raw) + levers_section(raw)
    if notes_file.exists() and out is None:
        lines += [notes_file.read_text().rstrip(), ""]
    lines += commands_section(raw)
    (out or HERE / "RESULTS.md").write_text("\n".join(lines))
