"""Do the examples do what they promise, at their defaults, whatever the seed and precision?

Each example config is trained and evaluated as a user would run it (`deltatune train EXAMPLE`,
one process per run), over seeds, at the precision `train.bf16: auto` picks on this CPU and in
fp32, with length-grouped batches on (the default) and off:

    python benchmarks/quality/examples_seeds.py --examples examples/sst2-minilm-lora.yaml \\
        --seeds 0 1 2 --precisions auto fp32 --grouping on off

Every finished run is written at once (the file is replaced whole), so an interrupted sweep keeps
what it measured; `--resume PATH` runs only the combinations PATH does not hold yet. Rows hold the
final and best metric, whether the run learned (training/collapse.py), its training seconds and
tokens/s, and the padded tokens the batches computed per real token (length grouping's lever).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine  # noqa: E402

PRECISIONS = {"auto": "auto", "fp32": "false"}
GROUPING = {"on": "true", "off": "false"}


def padded_per_real_token(example: str, seed: int, grouped: bool) -> float:
    """Tokens the training batches compute (each row padded to its batch's longest) per real
    token, over the run's own batch order: the work length grouping saves."""
    from deltatune.config.run import load_run_config
    from deltatune.data.dataset import build_dataset
    from transformers import AutoTokenizer

    from deltatune.models import resolve_model_path
    from deltatune.training.optimization import BatchStream

    config = load_run_config(example, [f"train.seed={seed}"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model))
    dataset = build_dataset(config.data, tokenizer, config.task, "train", seed, config.num_labels)
    lengths = [len(e.input_ids) for e in dataset]
    stream = BatchStream(len(lengths), config.train.batch_size, seed,
                         lengths=lengths if grouped else None)
    batches = [stream.rows(k) for k in range(stream.per_epoch)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths)


def run_one(example: str, seed: int, precision: str, grouping: str, work: Path,
            overrides: list[str]) -> dict:
    out = work / f"{Path(example).stem}-s{seed}-{precision}-{grouping}"
    command = [sys.executable, "-m", "deltatune.cli", "train", example, *overrides,
               f"train.seed={seed}", f"train.bf16={PRECISIONS[precision]}",
               f"train.group_by_length={GROUPING[grouping]}", "train.save_every=null",
               f"output_dir={out}", "--overwrite"]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{example} seed {seed} {precision} {grouping}: exit {done.returncode}: "
                         f"{done.stderr.strip().splitlines()[-1:] or ''}")
    summary = json.loads((out / "summary.json").read_text())
    metric = summary["metric"]
    return {
        "example": example, "precision": precision, "bf16": summary["bf16"],
        "group_by_length": grouping == "on", "seed": seed, "metric": metric,
        "final": summary["final_eval"].get(metric), "best": summary["best"]["value"],
        "best_step": summary["best"]["step"], "learned": summary.get("learned"),
        "steps": summary["steps"], "train_time_s": summary["train_time_s"],
        "tokens_per_s": summary["tokens_per_s"], "wall_s": round(time.time() - started, 1),
        "lr": summary["lr"],
    }


def write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["auto", "fp32"])
    parser.add_argument("--grouping", nargs="+", choices=sorted(GROUPING), default=["on", "off"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config overrides for every run (e.g. train.lr=5e-4)")
    parser.add_argument("--resume", help="a results file of this script: add what it lacks")
    parser.add_argument("--out", help="default: benchmarks/results/quality/<date>-examples-seeds-<cpu>.json")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(args.resume or args.out or machine.result_path("quality", "examples-seeds"))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if args.resume else {
        "date": datetime.date.today().isoformat(), "cpu_flags": machine.cpu_flags(),
        "cpu_kind": machine.cpu_kind(), "machine": machine.describe(),
        "padded_per_real_token": {}, "rows": []}
    # what was measured, whichever invocations it took (--resume and --out only say where)
    data["command"] = "python benchmarks/quality/examples_seeds.py " + shlex.join(
        ["--examples", *args.examples, "--seeds", *map(str, args.seeds), "--precisions",
         *args.precisions, "--grouping", *args.grouping, *(["--set", *args.set] if args.set else [])])
    if threads := os.environ.get("OMP_NUM_THREADS"):
        data["command"] = f"OMP_NUM_THREADS={threads} " + data["command"]
    done = {(r["example"], r["seed"], r["precision"], r["group_by_length"]) for r in data["rows"]}
    with tempfile.TemporaryDirectory(prefix="examples-seeds-") as work:
        for example in args.examples:
            for grouping in args.grouping:
                key = f"{example} group_by_length={grouping}"
                if key not in data["padded_per_real_token"]:
                    data["padded_per_real_token"][key] = round(
                        padded_per_real_token(example, args.seeds[0], grouping == "on"), 3)
            for seed in args.seeds:
                for precision in args.precisions:
                    for grouping in args.grouping:
                        if (example, seed, precision, grouping == "on") in done:
                            continue
                        row = run_one(example, seed, precision, grouping, Path(work), args.set)
                        print(json.dumps(row), flush=True)
                        data["rows"].append(row)
                        write(path, data)
    write(path, data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
