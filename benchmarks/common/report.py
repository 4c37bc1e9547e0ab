"""`make report`: benchmarks/RESULTS.md, generated in full from prose and raw results.

    python benchmarks/common/report.py [--out PATH]      # default: benchmarks/RESULTS.md

The prose lives in benchmarks/common/intro.md and benchmarks/<topic>/report.md (training, memory,
serving, quality, gpu); a line of the form

    {{ RENDERER path/or/glob/under/benchmarks/results }}

is replaced by the table that RENDERER builds from those raw result files. Every table, generated
or written by hand, sits under a caption line that states the date, the CPU flags, the precision
and the command (`caption()`; tests/test_benchmarks_report.py checks it). Dates and CPU kinds
come from the result files' names: <date>-<name>-<cpu kind>.json.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
RESULTS = BENCHMARKS / "results"
OUT = BENCHMARKS / "RESULTS.md"
SOURCES = ["common/intro.md", "training/report.md", "memory/report.md", "serving/report.md",
           "quality/report.md", "gpu/report.md"]
FLAGS = ("amx_tile", "avx2", "avx512_bf16")
KIND_FLAGS = {"amx": "amx_tile avx2 avx512_bf16", "avx512bf16": "avx2 avx512_bf16", "avx2": "avx2"}
PLACEHOLDER = re.compile(r"^\{\{\s*([\w-]+)\s+(\S+)\s*\}\}$")
CAPTION = re.compile(r"^\*Measured (\d{4}-\d{2}-\d{2}(?:, \d{4}-\d{2}-\d{2})*) · CPU flags: `[\w ]+`[^·]* · "
                     r"precision: [^·]+ · command: `[^`]+`.*\*$")
NAMES = {"deltatune": "deltatune LoRA", "peft-trainer": "peft + HF Trainer (dynamic padding)",
         "trl": "TRL SFTTrainer (padding_free)", "deltatune-full": "deltatune full fine-tuning"}


def caption(dates: list[str], flags: str, precision: str, command: str) -> str:
    """The line above every table: date(s), CPU flags, precision, command."""
    return (f"*Measured {', '.join(sorted(set(dates)))} · CPU flags: `{flags}` · precision: {precision} · "
            f"command: `{command}`*")


def _meta(path: Path) -> tuple[str, str]:
    """(date, CPU flags) from a result file's name: <date>-<name>-<vendor>-<unit>[-n].json."""
    date = path.name[:10]
    unit = next((u for u in KIND_FLAGS if f"-{u}" in path.stem), "avx2")
    return date, KIND_FLAGS[unit]


def _flags(listed: list[str] | str | None, path: Path) -> str:
    if listed:
        names = listed.split() if isinstance(listed, str) else listed
        return " ".join(sorted(set(names) & set(FLAGS)))
    return _meta(path)[1]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def _files(spec: str) -> list[Path]:
    files = sorted(RESULTS.glob(spec), key=lambda p: (p.name[:10], _run_number(p)))
    return files


def _run_number(path: Path) -> int:
    match = re.search(r"-(\d+)$", path.stem)
    return int(match.group(1)) if match and not path.stem.endswith(("-amx", "-avx512bf16", "-avx2")) else 1


# --- training ------------------------------------------------------------------------------------

def sft_bench(files: list[Path]) -> list[str]:
    """run.py's main + generate sections: the peers table and generate()."""
    out: list[str] = []
    for path in files:
        raw = json.loads(path.read_text())
        date, _ = _meta(path)
        flags = _flags(raw.get("hardware", {}).get("flags"), path)
        runs = {k.split(":", 1)[1]: [e["result"] for e in v] for k, v in raw.items() if k.startswith("main:")}
        first = next(iter(runs.values()))[0]
        precision = f"{first['precision']} autocast" + (", frozen weights bf16" if first.get("frozen_bf16") else "")
        rows = []
        for tool in NAMES:
            if tool not in runs:
                continue
            r = runs[tool]
            med = lambda key: statistics.median(x[key] for x in r)  # noqa: E731
            rows.append([NAMES[tool], f"{med('real_tokens_per_s'):.0f}", f"{med('step_s_median'):.2f}",
                         f"{med('peak_rss_gb'):.2f}", f"{statistics.mean(x['last_loss_mean'] for x in r):.4f}",
                         f"{med('model_gflops'):.0f}", _pct(med('mfu'))])
        out += [caption([date], flags, precision, f"python benchmarks/training/sft_run.py TOOL --steps "
                        f"{first['steps']} --warmup {first['warmup']}"), "",
                *_table(["tool", "real tokens/s", "step median (s)", "peak RSS (GB)", "loss, last 5 steps",
                         "model GFLOP/s", f"MFU (bf16 peak {first['peak_gflops']:,.0f} GFLOP/s)"], rows), ""]
        ours, peft = runs.get("deltatune"), runs.get("peft-trainer")
        if ours and peft:
            tps = lambda r: statistics.median(x["real_tokens_per_s"] for x in r)  # noqa: E731
            rss = lambda r: statistics.median(x["peak_rss_gb"] for x in r)  # noqa: E731
            line = (f"deltatune LoRA: {tps(ours) / tps(peft):.2f}x peft + HF Trainer's real tokens/s "
                    f"(target 1.5x) at {rss(ours) / rss(peft):.2f}x its peak RSS (target 0.7x)")
            if "trl" in runs:
                line += f"; {tps(ours) / tps(runs['trl']):.2f}x TRL's (target 1.2x)"
            if "deltatune-full" in runs:
                step = lambda r: statistics.median(x["step_s_median"] for x in r)  # noqa: E731
                line += f"; LoRA step {step(ours) / step(runs['deltatune-full']):.2f}x full fine-tuning's"
            out += [line + ".", ""]
        if raw.get("generate"):
            g = raw["generate"][-1]["result"]
            out += [caption([date], _flags(g.get("cpu_flags"), path), g["precision"],
                            "python benchmarks/serving/generate_latency.py"), "",
                    *_table(["model", "median (s)", "ratio to base", f"MFU ({g['precision']} peak "
                             f"{g['peak_gflops']:,.0f} GFLOP/s)"],
                            [[name, f"{s:.3f}", f"{g['ratio_to_base'][name]:.3f}", _pct(g['mfu'].get(name))]
                             for name, s in g["median_s"].items()]), "",
                    f"Greedy, batch 1, {g['prompt_tokens']} prompt tokens, {g['new_tokens']} new tokens, "
                    f"{g['rounds']} rounds alternated (medians); merged output equals unmerged: "
                    f"{g['merged_tokens_equal_unmerged']}.", ""]
    return out


POINTS = {"seq": "LoRA r8, {v} tokens a row", "rank": "LoRA r{v}, 512 tokens a row",
          "prompt": "prompt tuning, {v} virtual tokens", "prefix": "prefix tuning, {v} virtual tokens"}


def scaling(files: list[Path]) -> list[str]:
    """scaling.py points (run.py's scaling sections or a list of result rows)."""
    out: list[str] = []
    for path in files:
        raw = json.loads(path.read_text())
        date, _ = _meta(path)
        rows = raw if isinstance(raw, list) else [e["result"] for k, v in raw.items()
                                                  if k.startswith("scaling:") for e in v]
        points: dict[tuple[str, int], dict] = {}
        for r in rows:  # a point measured again replaces the earlier one
            points[(r["axis"], r["value"])] = r
        order = list(POINTS)
        chosen = sorted(points.values(), key=lambda r: (order.index(r["axis"]), r["value"]))
        first = chosen[0]
        out += [caption([date], _flags(first.get("cpu_flags"), path), f"{first['precision']} autocast, "
                        "frozen weights bf16", "python benchmarks/training/scaling.py AXIS VALUE [--batch N]"), "",
                *_table(["point", "batch x tokens", "step (s)", "tokens/s", "peak RSS (GB)", "model GFLOP/s",
                         "MFU"],
                        [[POINTS[r["axis"]].format(v=r["value"]), f"{r['batch']} x {r['seq']}",
                          f"{r['step_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_gb']:.2f}",
                          f"{r['model_gflops']:.0f}", f"{_pct(r['mfu'])} of {r['peak_gflops']:,.0f}"]
                         for r in chosen]), ""]
    return out


def levers(files: list[Path]) -> list[str]:
    out: list[str] = []
    for path in files:
        raw = json.loads(path.read_text())
        lines = raw["result"].splitlines()
        header = lines[:2]
        rows = []
        for line in lines[2:]:
            m = re.match(r"\s*(.+?)\s+step\s+([\d.]+) s\s+(\d+) real tok/s\s+x([\d.]+)\s+mean loss ([\d.]+)", line)
            if m:
                rows.append(list(m.groups()))
        out += [caption([raw["date"]], " ".join(raw["cpu_flags"]), raw["precision"], raw["command"]), "",
                *_table(["variant (same batches, one process)", "step (s)", "real tokens/s", "x peft",
                         "mean loss"], rows), "", f"{header[0].strip()}.", ""]
    return out


# --- memory --------------------------------------------------------------------------------------

def checkpoint_probes(files: list[Path]) -> list[str]:
    """memory/checkpoint_probes.py plan: each probe's measured one-step peak beside plan's."""
    out: list[str] = []
    for path in files:
        raw = json.loads(path.read_text())
        date, _ = _meta(path)
        train_keys = sorted({k for r in raw["rows"] for k in r["train"] if k != "bf16"})
        command = ("OMP_NUM_THREADS=1 python benchmarks/memory/checkpoint_probes.py measure MODEL_DIR "
                   "[--layers N] --lengths ..." + "".join(f" [--train {k}=...]" for k in train_keys)
                   + (" --train bf16=false" if "fp32" in raw["precision"] else "")
                   + "; checkpoint_probes.py plan POINTS.jsonl")
        rows = []
        order = sorted(raw["rows"], key=lambda r: (r["shape"]["hidden_size"], r["shape"]["num_hidden_layers"],
                                                   json.dumps(r["train"], sort_keys=True), r["length"]))
        for r in order:
            shape = r["shape"]
            name = (f"SmolLM2-135M ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']})"
                    if shape["hidden_size"] == 576 else
                    f"Llama-3.2-1B width, {shape['num_hidden_layers']} layers")
            name += "".join(f", {k} {v}" for k, v in sorted(r["train"].items()) if k != "bf16")
            run = "1 step" if r["from"] == "point" else f"sweep, {r['steps']} steps"
            rows.append([name, f"{r['length']:,}", run, f"{r['measured_bytes'] / 2**30:.2f} GiB",
                         f"{r['planned_bytes'] / 2**30:.2f} GiB", f"{100 * r['error']:+.0f}%"])
        out += [caption([date], _flags(raw.get("cpu_flags"), path), raw["precision"], command), "",
                *_table(["model", "tokens", "run", "measured peak RSS", "plan", "error"], rows), ""]
    return out


def fsdp(files: list[Path]) -> list[str]:
    out: list[str] = []
    for path in files:
        raw = json.loads(path.read_text())
        date, _ = _meta(path)
        runs = raw["results"]
        one = next(r for r in runs if r["run"] == "one process")
        rows = []
        for r in runs:
            peaks = r["peak_rss_mb_by_rank"]
            worst = max(peaks)
            rows.append([r["run"], " / ".join(str(p) for p in peaks), f"{worst / max(one['peak_rss_mb_by_rank']):.2f}x",
                         f"{r['plan_mb']:.0f}", f"{100 * (r['plan_mb'] / worst - 1):+.0f}%", f"{r['tokens_per_s']:.0f}"])
        out += [caption([date], _flags(raw.get("cpu_flags"), path), "fp32",
                        "python benchmarks/memory/fsdp_memory.py"), "",
                *_table(["run", "peak RSS per process (MB)", "vs one process", "plan (MB)", "plan error",
                         "tokens/s (whole job)"], rows), ""]
    return out


# --- serving -------------------------------------------------------------------------------------

SCENARIOS = {"continuous-mixed": "continuous, 8 adapters, `--max-adapters 4` (swapping)",
             "static-mixed": "static batching, same load",
             "continuous-single": "continuous, one adapter",
             "continuous-resident": "continuous, 8 adapters all resident"}


def serve_load(files: list[Path]) -> list[str]:
    """serve_load.py runs of one machine and precision: every scenario, tokens/s of each run."""
    runs = [(p, json.loads(p.read_text())) for p in files]
    by: dict[str, list[dict]] = {}
    for _, raw in runs:
        for r in raw["results"]:
            by.setdefault(r["scenario"], []).append(r)
    dtype = runs[0][1]["args"].get("dtype", "fp32")
    rows = []
    for key, name in SCENARIOS.items():
        if key not in by:
            continue
        rs = by[key]
        first = rs[0]
        correct = f"{sum(r['exact'] for r in rs)} / {sum(r['mixed_up'] for r in rs)} / {sum(r['diverged'] for r in rs)}"
        rows.append([name, " / ".join(f"{r['tokens_per_s']:.1f}" for r in rs), correct,
                     f"{first['ttft_p50']:.2f} / {first['ttft_p99']:.2f}",
                     f"{first['latency_p50']:.2f} / {first['latency_p99']:.2f}",
                     "-" if first.get("rows_per_step") is None else
                     f"{statistics.median(r['rows_per_step'] for r in rs):.1f}",
                     f"{100 * statistics.median(r['rss_growth'] for r in rs):+.1f}%"])
    ratios = [raw["mixed_over_single"] for _, raw in runs if "mixed_over_single" in raw]
    args = runs[0][1]["args"]
    command = "python benchmarks/serving/serve_load.py" + ("" if dtype == "fp32" else f" --dtype {dtype}")
    out = [caption([_meta(p)[0] for p, _ in runs], _flags(runs[0][1].get("cpu_flags"), runs[0][0]), dtype,
                   command + " [--scenarios ...]"), "",
           *_table(["scenario", "tokens/s (each run)", "exact / mixed-up / diverged replies",
                    "TTFT p50 / p99 (s)", "latency p50 / p99 (s)", "rows per decode step",
                    "RSS growth after the first quarter (median)"], rows), "",
           f"{len(runs)} runs, {args['requests']} requests from {args['clients']} clients each "
           f"({args['adapters']} LoRA adapters r={args['rank']}, max_tokens in {{{args['max_tokens']}}}); "
           "latencies from the first run."]
    if ratios:
        out[-1] += (" Swapping / one adapter, each run: " + ", ".join(f"{r:.3f}" for r in ratios)
                    + f" (median {statistics.median(ratios):.3f}).")
    if "static-mixed" in by and "continuous-mixed" in by:
        s, c = by["static-mixed"][0], by["continuous-mixed"][0]
        out[-1] += f" Continuous / static: {c['tokens_per_s'] / s['tokens_per_s']:.2f}x."
    return out + [""]


def mixed_step(files: list[Path]) -> list[str]:
    raws = [(p, json.loads(p.read_text())) for p in files]
    raws.sort(key=lambda pr: pr[1]["args"]["rows"])
    variants = list(raws[0][1]["median_step_ms"])
    a = raws[0][1]["args"]
    rows = [[r["args"]["rows"], *(f"{r['median_step_ms'][v]:.1f} ({r['over_one_adapter'][v]:.2f}x)"
                                  for v in variants)] for _, r in raws]
    return [caption([_meta(p)[0] for p, _ in raws], _flags(raws[0][1].get("cpu_flags"), raws[0][0]), "fp32",
                    f"python benchmarks/serving/mixed_step.py --rows ROWS --prompt {a['prompt']} "
                    f"--steps {a['steps']} --rounds {a['rounds']}"), "",
            *_table(["rows", *(f"{v} (ms)" for v in variants)], rows), ""]


# --- quality -------------------------------------------------------------------------------------

NF4 = {"dense": "dense base", "deltatune-nf4": "deltatune nf4",
       "transformers-bnb-nf4": "transformers + bitsandbytes nf4 (double quantization)",
       "transformers-bnb-nf4-no-double": "transformers + bitsandbytes nf4, no double quantization",
       "lowrank-r8-it1": "nf4 + rank-8 correction, 1 iteration",
       "lowrank-r8-it5": "nf4 + rank-8 correction, 5 iterations",
       "lowrank-r64-it1": "nf4 + rank-64 correction, 1 iteration"}


def nf4_gap(files: list[Path]) -> list[str]:
    out: list[str] = []
    for path in files:
        raw = json.loads(path.read_text())
        date, flags = _meta(path)
        rows = [[NF4.get(k, k), f"{v['loss']:.4f}", f"{100 * v['vs_dense']:+.1f}%",
                 "-" if "squared_error_vs_plain_nf4" not in v else f"{v['squared_error_vs_plain_nf4']:.2f}x"]
                for k, v in raw.items()]
        out += [caption([date], flags, "bf16 autocast", "python benchmarks/quality/nf4_gap.py"), "",
                *_table(["base", "loss on the last 5 steps' rows", "vs dense", "squared weight error vs plain nf4"],
                        rows), ""]
    return out


def loftq_init(files: list[Path]) -> list[str]:
    """quality/loftq_init.py: LoftQ vs the plain init on an nf4 base, beside dense LoRA."""
    if not files:
        return ["No result file `benchmarks/results/quality/*loftq-init*.json` yet: run "
                "`python benchmarks/quality/loftq_init.py`, then `make report`.", ""]
    out: list[str] = []
    for path in files:
        raw = json.loads(path.read_text())
        date, flags = _meta(path)
        rows = [[k, f"{v['start_loss']:.4f}", f"{100 * v['start_vs_dense']:+.1f}%",
                 f"{v['last5_loss']:.4f}", f"{100 * v['last5_vs_dense']:+.1f}%", f"{v['init_s']:.1f}"]
                for k, v in raw.items() if k != "settings"]
        rounds = max(v["loftq_iter"] for k, v in raw.items() if k != "settings")
        command = "python benchmarks/quality/loftq_init.py" + (f" --iterations {rounds}" if rounds > 1 else "")
        out += [caption([date], flags, "bf16 autocast", command), "",
                *_table(["row", "loss at the start (last 5 steps' rows)", "vs dense", "training loss, last 5 steps",
                         "vs dense", "init s"], rows), ""]
    return out


def examples_seeds(files: list[Path]) -> list[str]:
    """quality/examples_seeds.py: each example over seeds, per precision and length grouping."""
    if not files:
        return ["No result file `benchmarks/results/quality/*examples-seeds*.json` yet: run "
                "`python benchmarks/quality/examples_seeds.py`, then `make report`.", ""]
    names = {"auto": "bf16 autocast (`train.bf16: auto`)", "fp32": "fp32"}
    out: list[str] = []
    for path in files:
        data = json.loads(path.read_text())
        rows = data["rows"]
        precisions = " and ".join(names[p] for p in dict.fromkeys(r["precision"] for r in rows))
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault((r["example"], r["precision"], r["group_by_length"]), []).append(r)
        table = []
        for (example, precision, grouped), rs in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], not g[0][2])):
            rs = sorted(rs, key=lambda r: r["seed"])
            values = [r["final"] for r in rs]
            padded = data.get("padded_per_real_token", {}).get(
                f"{example} group_by_length={'on' if grouped else 'off'}")
            table.append([f"`{example.removeprefix('examples/')}`", "bf16" if rs[0]["bf16"] else "fp32",
                          "on" if grouped else "off", rs[0]["metric"],
                          ", ".join(f"{r['seed']}: {100 * r['final']:.1f}" for r in rs),
                          f"{100 * statistics.mean(values):.1f}", f"{100 * min(values):.1f}",
                          f"{sum(bool(r['learned']) for r in rs)} of {len(rs)}",
                          f"{statistics.mean(r['train_time_s'] for r in rs):.0f}",
                          f"{statistics.mean(r['tokens_per_s'] for r in rs):.0f}",
                          f"{padded:.2f}" if padded else "-"])
        out += [caption([data["date"]], _flags(data.get("cpu_flags"), path), precisions, data["command"]), "",
                *_table(["example", "precision", "length grouping", "metric", "seed: value (%)", "mean (%)",
                         "lowest (%)", "learned", "train time (s)", "real tokens/s",
                         "computed tokens per real token"], table), ""]
    return out


def method_comparison(files: list[Path]) -> list[str]:
    """quality/weight_methods.py: compare's own rows, one table per comparison; step times as
    measured in that comparison (a loaded machine moves them: method-step-time has the ratios)."""
    if not files:
        return ["No result file yet: run `python benchmarks/quality/weight_methods.py`, then `make report`.", ""]
    out: list[str] = []
    for path in files:
        data = json.loads(path.read_text())
        date, _ = _meta(path)
        rows = data["rows"]
        forgetting = any(r.get("forgetting") is not None for r in rows)
        table = []
        for r in rows:
            plan = r.get("planned_peak_mb")
            cells = [r["method"], _pct(r["score"]) + ("" if r.get("learned", True) else " (did not learn)"),
                     f"{r['trainable_params']:,}", f"{r['time_per_step_s']:.2f}",
                     f"{r['peak_memory_mb']:.0f}",
                     "-" if plan is None else f"{plan:.0f} ({r['plan_error_percent']:+.1f}%)",
                     f"{r['saved_mb']:.2f}"]
            if forgetting:
                f = r.get("forgetting")
                cells.append("-" if f is None else f"{f:+.3f}")
            table.append(cells)
        head = ["method", "score", "trainable", "s/step (that run)", "peak RSS MB", "planned MB (error)", "file MB"]
        out += [caption([date], _flags(data.get("cpu_flags"), path), data["precision"], data["command"]), "",
                *_table(head + (["forgetting (Δ ppl)"] if forgetting else []), table), ""]
    return out


def _value(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _mean_std(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None:
        return "-"
    return fmt.format(scale * value) + ("" if std is None else " ± " + fmt.replace("+", "").format(scale * std))


def _learned(row: dict) -> str:
    if row.get("learned") is None:
        return "-"
    missed = row.get("not_learned_seeds") or (0 if row["learned"] else row.get("seeds", 1))
    seeds = row.get("seeds", 1)
    return "yes" if not missed else "no" if missed == seeds else f"{seeds - missed} of {seeds} seeds"


def _chosen(search: dict | None) -> str:
    if search is None:
        return "defaults (not searched)"
    if search["indistinct"]:
        return f"defaults: trials could not be told apart — {search['indistinct']}"
    if not search["chosen"]:
        return "none: every trial failed"
    return ", ".join(f"{k}={_value(v)}" for k, v in search["chosen"].items())


def reference_comparison(files: list[Path]) -> list[str]:
    """quality/reference_comparison.py: a finished comparison with a search, seeds and a learning
    curve: each method's mean ± std over the seeds at its searched settings, then the curve."""
    if not files:
        return ["No result file yet: when a reference comparison has finished, run `python "
                "benchmarks/quality/reference_comparison.py --from OUT_DIR --config CONFIG --name NAME`, "
                "then `make report`.", ""]
    out: list[str] = []
    for path in files:
        data = json.loads(path.read_text())
        date, _ = _meta(path)
        flags = _flags(data.get("cpu_flags"), path)
        b, rows, searched = data["budget"], data["rows"], data["search"]
        seeds = len(b["seeds"])
        contended = " · wall and step times contended (run beside other jobs)" if data.get("contended") else ""
        captioned = caption([date], flags, data["precision"], data["command"])[:-1] + contended + "*"
        forgetting = any(r.get("forgetting") is not None for r in rows)
        percent = rows and next((r.get("metric") for r in rows if r.get("metric")), "accuracy") != "perplexity"
        score_fmt, scale = ("{:.2f}", 100.0) if percent else ("{:.3f}", 1.0)
        table = []
        for r in rows:
            if "error" in r:
                table.append([r["method"], f"failed: {r['error'][:80]}", *["-"] * (8 + forgetting)])
                continue
            score = _mean_std(r, "score", score_fmt, scale) + ("%" if percent and r.get("score") is not None else "")
            if r.get("learned") is False:
                score += " (did not learn)"
            s = searched.get(r["method"])
            trials = "-" if s is None else f"{s['complete']} / {s['pruned']} / {s['failed']}"
            plan = r.get("planned_peak_mb")
            cells = [r["method"], score, _learned(r), _chosen(s), trials, f"{r['trainable_params']:,}",
                     _mean_std(r, "time_per_step_s", "{:.3f}"), _mean_std(r, "peak_memory_mb", "{:.0f}"),
                     "-" if plan is None else f"{plan:.0f}", f"{r['saved_mb']:.2f}"]
            if forgetting:
                cells.append(_mean_std(r, "forgetting", "{:+.3f}"))
            table.append(cells)
        metric = next((r.get("metric") for r in rows if r.get("metric")), "score")
        head = ["method", f"{metric}, mean ± std over {seeds} seeds", "learned", "chosen configuration",
                "trials (complete / pruned / failed)", "trainable", "s/step", "peak MB", "plan MB", "file MB"]
        out += [f"{b['model']} on {b['data']}, {len(rows)} methods; {_reference_budget(b)}:", "",
                captioned, "",
                *_table(head + (["forgetting (Δ ppl)"] if forgetting else []), table), ""]
        curves = data.get("curves") or {}
        if curves:
            sizes = sorted(curves, key=int)
            curve_rows = []
            for i, r in enumerate(curves[sizes[0]]):
                cells = [r["method"]]
                for size in sizes:
                    c = curves[size][i]
                    if "error" in c or c.get("score") is None:
                        cells.append("failed")
                        continue
                    cell = _mean_std(c, "score", score_fmt, scale) + ("%" if percent else "")
                    cells.append(cell + (" (did not learn)" if c.get("learned") is False else ""))
                curve_rows.append(cells)
            out += [f"Learning curve: {metric} (mean ± std over {seeds} seeds) per number of training rows, "
                    "each method at its searched settings:", "",
                    captioned, "",
                    *_table(["method", *(f"{int(s):,} rows" for s in sizes)], curve_rows), ""]
        if data.get("report"):
            out += [f"The comparison's own report, with every search trial: `{data['report']}`.", ""]
    return out


def _reference_budget(b: dict) -> str:
    search = b.get("search")
    line = ""
    if search:
        steps = f"{search['steps']} steps" if search["steps"] else "the run's epochs"
        line = (f"search {search['trials']} Optuna trials per method ({steps} on {search['rows']:,} training "
                f"rows, scored on {search['heldout_rows']:,} others; pruner {search['pruner']}), then ")
    rows = f"{b['rows']:,}" if b.get("rows") else "all"
    return (line + f"final runs on {rows} training rows, {b['epochs']:g} epoch(s), batch {b['batch']}, "
            f"seeds {', '.join(map(str, b['seeds']))}")


def method_step_time(files: list[Path]) -> list[str]:
    """training/method_step_time.py: every method's step beside LoRA's, alternated in one process."""
    if not files:
        return ["No result file yet: run `python benchmarks/training/method_step_time.py`, then `make report`.", ""]
    out: list[str] = []
    for path in files:
        data = json.loads(path.read_text())
        date, _ = _meta(path)
        rows = [[r["method"], f"{r['trainable_params']:,}", f"{r['median_step_s']:.3f}",
                 f"{min(r['step_times_s']):.3f}-{max(r['step_times_s']):.3f}", f"{r['vs_lora']:.2f}×"]
                for r in data["rows"]]
        out += [f"{data['model']}, batch {data['batch']} × {data['seq']} tokens, "
                f"{len(data['rows'][0]['step_times_s'])} timed steps per method after {data['warmup']} of warm-up:", "",
                caption([date], _flags(data.get("cpu_flags"), path), data["precision"], data["command"]), "",
                *_table(["method", "trainable", "median s/step", "range", "vs LoRA (median of per-round ratios)"], rows), ""]
    return out


RENDERERS = {"sft-bench": sft_bench, "scaling": scaling, "levers": levers, "fsdp": fsdp,
             "serve-load": serve_load, "mixed-step": mixed_step, "nf4-gap": nf4_gap,
             "loftq-init": loftq_init, "method-comparison": method_comparison,
             "method-step-time": method_step_time,
             "examples-seeds": examples_seeds, "reference-comparison": reference_comparison,
             "checkpoint-probes": checkpoint_probes}


def render() -> str:
    lines: list[str] = []
    for source in SOURCES:
        path = BENCHMARKS / source
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            match = PLACEHOLDER.match(line.strip())
            if match:
                name, spec = match.groups()
                lines += RENDERERS[name](_files(spec))
            else:
                lines.append(line)
        if lines and lines[-1] != "":
            lines.append("")
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build benchmarks/RESULTS.md from the prose and raw results.")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    Path(args.out).write_text(render())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
