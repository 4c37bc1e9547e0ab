"""The newer method families beside LoRA, each at its defaults, through `deltatune compare` as a
user runs it: by default OFT, BOFT, LoHa and LoKr on the MiniLM demo budget (SST-2, 8,000 rows,
one epoch, batch 32); `--config`/`--methods`/`--name` for another comparison (the SmolLM2 one):

    python benchmarks/quality/weight_methods.py                      # run the comparison, record it
    python benchmarks/quality/weight_methods.py --from DIR           # record a finished compare output
    python benchmarks/quality/weight_methods.py --max-steps 60       # a shorter run, for step times
    python benchmarks/quality/weight_methods.py --config examples/compare-smollm2.yaml \
        --methods lora,oft,boft,loha,lokr,vera,adalora,ln-tuning --name new-methods-smollm2

The rows (score, trainable parameters, s/step, peak RSS, planned peak, file size) are compare's
own results.json, written with the machine's description to
results/quality/<date>-weight-methods[-steps]-<cpu kind>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine  # noqa: E402

CONFIG = "examples/demo-compare-minilm.yaml"
METHODS = "lora,oft,boft,loha,lokr"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", help="a finished compare output directory to record")
    parser.add_argument("--max-steps", type=int, default=None, help="train.max_steps for every method")
    parser.add_argument("--config", default=CONFIG, help="the compare config")
    parser.add_argument("--methods", default=METHODS, help="the methods, comma-separated")
    parser.add_argument("--name", default="weight-methods", help="the result's name")
    args = parser.parse_args(argv)
    command = ["deltatune", "compare", args.config, "--methods", args.methods]
    if args.max_steps:
        command.append(f"train.max_steps={args.max_steps}")
    out = Path(args.source) if args.source else Path(tempfile.mkdtemp(prefix="weight-methods-"))
    if not args.source:
        subprocess.run([sys.executable, "-m", "deltatune.cli", *command[1:], f"output_dir={out}"], check=True)
    rows = json.loads((out / "results.json").read_text())
    keep = ("method", "score", "trainable_params", "time_per_step_s", "steps", "peak_memory_mb",
            "planned_peak_mb", "plan_error_percent", "saved_mb", "lr", "forgetting", "learned")
    name = args.name + (f"-{args.max_steps}-steps" if args.max_steps else "")
    machine.write_result({
        "machine": machine.describe(), "cpu_flags": machine.cpu_flags(), "precision": "bf16 autocast",
        "command": " ".join(command), "rows": [{k: row.get(k) for k in keep} for row in rows],
    }, "quality", name)


if __name__ == "__main__":
    main()
