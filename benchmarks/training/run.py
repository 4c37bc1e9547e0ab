"""`make bench`: deltatune vs peft + HF Trainer vs TRL, LoRA vs full, generate() latency, scaling.

    python benchmarks/training/run.py [--sections main,generate,scaling,levers] [--repeats 2] [--steps 14]

Every measured run is its own process, started under `flock /tmp/deltatune-heavy.lock` so that no
other heavy job on this shared machine overlaps it; the tools take turns (deltatune, peft +
Trainer, TRL, deltatune full fine-tuning, then again). Raw results go to
benchmarks/results/training/<date>-sft-bench-<cpu kind>.json (or --raw PATH) after every run (an
interrupted bench keeps what it measured); `make report` then rebuilds benchmarks/RESULTS.md from
every raw result (benchmarks/common/report.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
sys.path.insert(0, str(BENCHMARKS))  # the common package
from common import machine  # noqa: E402

SCRIPTS = {"sft_run.py": HERE, "scaling.py": HERE, "levers.py": HERE,
           "generate_latency.py": BENCHMARKS / "serving"}
LOCK = "/tmp/deltatune-heavy.lock"
RAW: Path = Path()  # set in main()
SECTIONS = ("main", "generate", "scaling", "levers")
MAIN_TOOLS = ("deltatune", "peft-trainer", "trl", "deltatune-full", "deltatune-frozen-fp32")
SEQ_LENGTHS = (128, 256, 512, 1024, 2048)
RANKS = (4, 8, 16, 32, 64)
VIRTUAL_TOKENS = (8, 32, 128)


HELD = False  # --held: the caller already holds the lock (flock LOCK python run.py --held)
NICE: list[str] = []  # --nice N: run each measurement at that priority (a busy shared machine)


def command(script: str, *args: object) -> list[str]:
    lock = [] if HELD else ["flock", LOCK]
    return [*lock, *NICE, sys.executable, str(SCRIPTS[script] / script), *map(str, args)]


def measure(cmd: list[str], raw: dict, key: str) -> dict | str | None:
    """Run one measurement; its last stdout line is JSON (or, for levers, the whole text)."""
    script = next(i for i, c in enumerate(cmd) if c.endswith(".py"))
    shown = " ".join(["python", *[c.replace(str(BENCHMARKS.parent) + "/", "") for c in cmd[script:]]])
    print(f"[bench] {shown}", flush=True)
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCHMARKS.parent)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        print(f"[bench] FAILED ({done.returncode}): {shown}", flush=True)
        return None
    lines = [l for l in done.stdout.splitlines() if l.strip()]
    result = json.loads(lines[-1]) if key != "levers" else "\n".join(lines)
    entry = {"command": shown, "wall_s": round(time.time() - started, 1), "result": result}
    raw.setdefault(key, []).append(entry)
    RAW.write_text(json.dumps(raw, indent=1))
    print(f"[bench]   done in {entry['wall_s']} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tools", default=",".join(MAIN_TOOLS))
    parser.add_argument("--scaling-points", default=None,
                        help="e.g. seq:128,seq:512,prompt:32 (default: every point)")
    parser.add_argument("--keep", action="store_true", help="add to the --raw file, do not reset it")
    parser.add_argument("--held", action="store_true",
                        help="the caller holds /tmp/deltatune-heavy.lock for the whole bench")
    parser.add_argument("--raw", default=None, help="where the raw results go (default benchmarks/results/training/)")
    parser.add_argument("--nice", type=int, default=None,
                        help="niceness of each measured process (e.g. -10 when others share the cores)")
    args = parser.parse_args()
    global HELD, RAW, NICE
    HELD = args.held
    RAW = Path(args.raw) if args.raw else machine.result_path("training", "sft-bench")
    RAW.parent.mkdir(parents=True, exist_ok=True)
    NICE = ["nice", "-n", str(args.nice)] if args.nice is not None else []
    sections = args.sections.split(",")
    raw = json.loads(RAW.read_text()) if args.keep and RAW.exists() else {}
    # The matmul peaks every MFU figure divides by, measured afresh under the lock (a probe taken
    # while others used the cores would understate the peak and flatter every MFU).
    lock = [] if HELD else ["flock", LOCK]
    probe = subprocess.run([*lock, *NICE, sys.executable, "-c", "import sys; sys.path.insert(0, 'src'); "
                            "from deltatune.cli import main; "
                            "sys.exit(main(['inspect', '--hardware', '--refresh', '--json']))"],
                           capture_output=True, text=True, cwd=BENCHMARKS.parent)
    if probe.returncode == 0:
        raw["hardware"] = json.loads(probe.stdout)
        print(f"[bench] matmul peaks: fp32 {raw['hardware']['fp32_gflops']:,.0f}, bf16 "
              f"{raw['hardware']['bf16_gflops']:,.0f} GFLOP/s", flush=True)
    raw.setdefault("settings", {"steps": args.steps, "warmup": args.warmup,
                                "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"),
                                "cpu_flags": machine.cpu_flags(), "machine": machine.describe()})
    if "main" in sections:
        for _ in range(args.repeats):
            for tool in args.tools.split(","):
                measure(command("sft_run.py", tool, "--steps", args.steps, "--warmup", args.warmup),
                        raw, f"main:{tool}")
    if "generate" in sections:
        measure(command("generate_latency.py"), raw, "generate")
    if "scaling" in sections:
        points = ([("seq", n) for n in SEQ_LENGTHS] + [("rank", r) for r in RANKS]
                  + [(m, n) for m in ("prompt", "prefix") for n in VIRTUAL_TOKENS])
        if args.scaling_points:
            points = [(p.split(":")[0], int(p.split(":")[1])) for p in args.scaling_points.split(",")]
        for axis, value in points:
            measure(command("scaling.py", axis, value), raw, f"scaling:{axis}")
    if "levers" in sections:
        measure(command("levers.py", "--batches", 3, "--rounds", 1), raw, "levers")
    RAW.write_text(json.dumps(raw, indent=1))
    print(f"[bench] wrote {RAW}; `make report` rebuilds benchmarks/RESULTS.md", flush=True)


if __name__ == "__main__":
    main()
