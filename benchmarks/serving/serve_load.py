"""Load test of `deltatune serve`: continuous vs static batching, many adapters vs one.

Each scenario starts the real server (`python -m deltatune.cli serve`, 127.0.0.1, a free port)
as a child process, sends the same seeded workload from --clients concurrent clients, then stops
it with SIGTERM (graceful drain) and checks it exits 0. The workload: --requests requests, half
streaming, prompts of mixed length (one sentence to a long paragraph), max_tokens mixed
(--max-tokens list), greedy, ignore_eos (every request generates exactly max_tokens), spread over
--adapters random LoRA adapters served from one --adapter-dir with --max-adapters resident
("resident" scenarios keep all of them resident: mixing cost without swapping; the static engine
never evicts). "single" sends the same requests all to adapter0.

Every reply is checked against the library alone: load_adapter + generate() of that adapter on
all prompts (one left-padded batch per adapter). A reply that differs is "mixed up" when it equals another
adapter's answer, else "diverged" (where it departs is reported: batched float32 sums can flip a
near-tie). Reports p50/p99 time to first token (streaming requests) and latency, tokens/s, and
the server's RSS (sampled every 0.2 s; flat = the peak after the first quarter of the run is
within 10% of the peak in that first quarter; also the second half's peak over the first half's,
which a leak raises and the allocator's warm-up does not, and the series, one sample a second).
Bounded: --requests requests, --deadline seconds.

    python benchmarks/serving/serve_load.py [--dtype bf16] [--json PATH]

The result goes to benchmarks/results/serving/<date>-serve-load[-bf16]-<cpu kind>.json unless --json
names a file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.serving.server import serving_dtype  # noqa: E402

SENTENCES = [
    "The printing press changed how ideas spread across Europe.",
    "Mountains are cold at night even in summer, so hikers carry warm layers and a small stove.",
    "A refrigerator moves heat from inside the box to the room by compressing and expanding a gas.",
    "Write a friendly reminder to drink water, stretch, and take a short walk after lunch today.",
    "Rivers carve valleys over thousands of years, carrying sand and stones down to the sea.",
    "The library opens at nine, closes at six, and lends books, music, films and even tools.",
]


def prompts(count: int, seed: int) -> list[str]:
    """`count` prompts from one sentence (~15 tokens) to a long paragraph (~250 tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        sentences = [1, 2, 4, 8, 12, 16][i % 6]
        out.append(" ".join(rng.choice(SENTENCES) for _ in range(sentences)) + " In short,")
    return out


def workload(args) -> list[dict]:
    rng = random.Random(args.seed)
    texts = prompts(args.prompts, args.seed)
    lengths = [int(x) for x in args.max_tokens.split(",")]
    return [{"adapter": f"adapter{rng.randrange(args.adapters)}", "prompt": rng.choice(texts),
             "max_tokens": rng.choice(lengths), "stream": i % 2 == 0} for i in range(args.requests)]


def make_adapters(model, directory: Path, count: int, rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        name = f"adapter{i}"
        dt.apply(model, dt.LoraConfig(r=rank, alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"]), name)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.03)
        dt.save_adapter(model, directory / name, name=name)
        dt.delete_adapter(model, name)


def references(model, tokenizer, directory: Path, requests: list[dict], longest: int) -> dict:
    """(adapter, prompt) -> greedy ids of `longest` tokens from the library alone: per adapter,
    load_adapter + one left-padded generate() over the prompts (no serving code involved)."""
    refs = {}
    texts = sorted({r["prompt"] for r in requests})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(t).input_ids for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    for adapter in sorted({r["adapter"] for r in requests}):
        dt.load_adapter(model, directory / adapter, name=adapter)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, do_sample=False,
                                 pad_token_id=pad, eos_token_id=[], temperature=None, top_p=None, top_k=None)
        for text, row in zip(texts, out[:, width:].tolist()):
            refs[adapter, text] = row
        dt.delete_adapter(model, adapter)
        print(f"  reference answers of {adapter} ready", flush=True)
    return refs


def cached_references(args, model, tokenizer, directory: Path, requests: list[dict], longest: int) -> dict:
    """references(), kept in --references-cache: a rerun with the same model, adapters (same seed and
    rank) and workload reads them back instead of spending a minute on generate()."""
    key = json.dumps([args.model, args.adapters, args.rank, args.seed, requests, longest, args.dtype])
    path = Path(args.references_cache) if args.references_cache else None
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return {(a, p): ids for a, p, ids in stored["answers"]}
    refs = references(model, tokenizer, directory, requests, longest)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "answers": [[a, p, ids] for (a, p), ids in refs.items()]}))
        tmp.replace(path)
    return refs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(client: httpx.Client, url: str, request: dict, model: str) -> dict:
    body = {"model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"],
            "temperature": 0, "ignore_eos": True, "stream": request["stream"]}
    start = time.perf_counter()
    first = None
    try:
        if request["stream"]:
            parts = []
            with client.stream("POST", url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return {"ok": False, "error": f"HTTP {response.status_code}"}
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return {"ok": False, "error": chunk["error"]["message"]}
                    text = chunk["choices"][0]["text"]
                    if text and first is None:
                        first = time.perf_counter() - start
                    parts.append(text)
            text = "".join(parts)
        else:
            response = client.post(url + "/v1/completions", json=body)
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
            text = response.json()["choices"][0]["text"]
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "text": text, "ttft": first, "latency": time.perf_counter() - start}


def server_counters(url: str) -> dict[str, float]:
    """Totals from the server's /metrics so far: decode steps, adapter loads
    and evictions, generated tokens, prefill forwards, engine seconds per phase (continuous)."""
    wanted = {"deltatune_decode_steps_total": "decode_steps", "deltatune_adapter_loads_total": "adapter_loads",
              "deltatune_adapter_evictions_total": "adapter_evictions",
              "deltatune_generation_tokens_total": "generated_tokens",
              "deltatune_requests_total": "finished_requests",
              "deltatune_prefill_forwards_total": "prefill_forwards"}
    totals = dict.fromkeys(wanted.values(), 0.0)
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in wanted and not line.startswith("#"):
            totals[wanted[name]] += float(line.rsplit(" ", 1)[1])
        elif name == "deltatune_engine_seconds_total":  # {phase="prefill"} -> prefill_seconds
            totals[line.split('"')[1] + "_seconds"] = float(line.rsplit(" ", 1)[1])
    return totals


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def run_scenario(name: str, engine: str, requests: list[dict], single: bool, args, adapter_dir: Path,
                 expected: dict, answers: dict) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "deltatune.cli", "serve", "--model", args.model, "--port", str(port),
               "--engine", engine, "--adapter-dir", str(adapter_dir),
               "--max-adapters", str(args.adapters if name.endswith("resident") else args.max_adapters),
               "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--dtype", args.dtype]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name}: the server did not start:\n{server.stdout.read()}")
        time.sleep(0.5)
    process = psutil.Process(server.pid)
    rss: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            rss.append((time.perf_counter(), process.memory_info().rss))

    with httpx.Client(timeout=args.deadline) as warm:  # each adapter once, outside the timing
        for i in range(1 if single else args.adapters if name.endswith("resident") else args.max_adapters):
            one_request(warm, url, {"prompt": "Hello", "max_tokens": 2, "stream": False}, f"adapter{i}")
    before = server_counters(url)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [httpx.Client(timeout=args.deadline) for _ in range(args.clients)]
    local = threading.local()
    counter = iter(range(len(clients)))
    lock = threading.Lock()

    def job(request: dict) -> dict:
        if not hasattr(local, "client"):
            with lock:
                local.client = clients[next(counter)]
        return one_request(local.client, url, request, "adapter0" if single else request["adapter"])

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(job, requests))
    seconds = time.perf_counter() - start
    sampling.set()
    sampler.join()
    for client in clients:
        client.close()
    counters = {k: v - before.get(k, 0.0) for k, v in server_counters(url).items()}  # the timed run's
    server.send_signal(signal.SIGTERM)
    try:
        exit_code = server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        exit_code = "killed"
    failed = [r["error"] for r in results if not r["ok"]]
    checked = {"exact": 0, "mixed_up": 0, "diverged": 0}
    diverged_at = []
    for request, result in zip(requests, results):
        if not result["ok"]:
            continue
        adapter = "adapter0" if single else request["adapter"]
        k = request["max_tokens"]
        if result["text"] == answers[adapter, request["prompt"], k]:
            checked["exact"] += 1
        elif any(result["text"] == answers[a, request["prompt"], k] for a in expected):
            checked["mixed_up"] += 1
        else:
            checked["diverged"] += 1
            want = answers[adapter, request["prompt"], k]
            diverged_at.append(next((i for i, (x, y) in enumerate(zip(result["text"], want)) if x != y),
                                    min(len(want), len(result["text"]))))
    quarter, half = start + seconds / 4, start + seconds / 2
    early = max((v for t, v in rss if t <= quarter), default=0)
    late = max((v for t, v in rss if t > quarter), default=0)
    # A leak grows with time: the second half's peak over the first half's. The first quarter
    # alone can end before the server has met its largest batch (the warm-up is one short
    # request per adapter), so first-quarter growth can be the allocator reaching steady state.
    first_half = max((v for t, v in rss if t <= half), default=0)
    second_half = max((v for t, v in rss if t > half), default=0)
    series = [(round(t - start, 1), round(v / 2**20)) for t, v in rss[::5]]  # one sample a second
    ttft = [r["ttft"] for r in results if r["ok"] and r["ttft"] is not None]
    latency = [r["latency"] for r in results if r["ok"]]
    tokens = sum(r["max_tokens"] for r, res in zip(requests, results) if res["ok"])
    summary = {
        "scenario": name, "engine": engine, "requests": len(requests), "failed": len(failed),
        "failures": failed[:5], **checked, "diverged_at_char": diverged_at[:10],
        "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "latency_p50": percentile(latency, 50), "latency_p99": percentile(latency, 99),
        "rss_first_quarter_mb": early / 2**20, "rss_rest_mb": late / 2**20,
        "rss_growth": late / early - 1 if early else None,
        "rss_first_half_mb": first_half / 2**20, "rss_second_half_mb": second_half / 2**20,
        "rss_second_half_growth": second_half / first_half - 1 if first_half else None,
        "rss_series_mb": series, "sigterm_exit": exit_code, **counters,
        # rows in the batch per decoding step: every generated token but each request's first
        # (which comes from its prefill) is one row of one step
        "rows_per_step": ((counters["generated_tokens"] - counters["finished_requests"]) / counters["decode_steps"]
                          if counters["decode_steps"] else None),
    }
    print(f"{name:>18}: {summary['tokens_per_s']:6.1f} tok/s, {tokens} tokens in {seconds:.1f} s, "
          f"failed {len(failed)}, exact {checked['exact']}, mixed-up {checked['mixed_up']}, diverged "
          f"{checked['diverged']}; TTFT p50/p99 {summary['ttft_p50']:.2f}/{summary['ttft_p99']:.2f} s, "
          f"latency p50/p99 {summary['latency_p50']:.2f}/{summary['latency_p99']:.2f} s; rows/step "
          f"{summary['rows_per_step'] or 0:.1f}, adapter loads {counters['adapter_loads']:.0f}; engine s prefill/"
          f"decode/idle {counters.get('prefill_seconds', 0):.1f}/{counters.get('decode_seconds', 0):.1f}/"
          f"{counters.get('idle_seconds', 0):.1f} ({counters['prefill_forwards']:.0f} prefills); RSS "
          f"{early / 2**20:.0f} -> {late / 2**20:.0f} MB (halves {first_half / 2**20:.0f} -> "
          f"{second_half / 2**20:.0f}); SIGTERM exit {exit_code}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-adapters", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", default="4,8,16,24", help="comma-separated choices")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=600, help="seconds any one request may take")
    parser.add_argument("--scenarios", default="continuous-mixed,static-mixed,continuous-single,continuous-resident",
                        help="from continuous-mixed, static-mixed, continuous-single, static-single, "
                             "continuous-resident (mixed, with every adapter resident: no swapping)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="the server's --dtype; the reference generate() runs in the same precision")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/serving/")
    parser.add_argument("--references-cache", default=None,
                        help="JSON file keeping the generate() reference answers between runs")
    args = parser.parse_args(argv)
    flags = machine.cpu_flags()
    print(f"cpu flags: {' '.join(flags)}; cores {os.cpu_count()}", flush=True)

    requests = workload(args)
    longest = max(r["max_tokens"] for r in requests)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        adapter_dir = Path(tmp)
        dtype = serving_dtype(args.dtype)
        args.dtype = "bf16" if dtype == torch.bfloat16 else "fp32"  # auto, resolved once for both sides
        model, tokenizer = dt.load_model(args.model, task="causal-lm", dtype=dtype)
        print(f"{args.model} loaded ({args.dtype})", flush=True)
        make_adapters(model, adapter_dir, args.adapters, args.rank, args.seed)
        start = time.perf_counter()
        refs = cached_references(args, model, tokenizer, adapter_dir, requests, longest)
        lengths = sorted({r["max_tokens"] for r in requests})
        answers = {(a, p, k): tokenizer.decode(ids[:k], skip_special_tokens=True)
                   for (a, p), ids in refs.items() for k in lengths}
        distinct = len({answers[a, p, longest] for (a, p) in refs}) / len(refs)
        print(f"references: {len(refs)} answers from {args.adapters} generate() calls (or the cache) in {time.perf_counter() - start:.0f} s; "
              f"{distinct:.0%} of (adapter, prompt) answers distinct", flush=True)
        del model
        expected = sorted({r["adapter"] for r in requests})
        results = []
        for scenario in args.scenarios.split(","):
            engine, kind = scenario.split("-")
            results.append(run_scenario(scenario, engine, requests, kind == "single", args, adapter_dir,
                                        expected, answers))
    by_name = {r["scenario"]: r for r in results}
    summary = {"cpu_flags": flags, "args": vars(args), "results": results}
    if "continuous-mixed" in by_name and "static-mixed" in by_name:
        summary["continuous_over_static"] = (by_name["continuous-mixed"]["tokens_per_s"]
                                             / by_name["static-mixed"]["tokens_per_s"])
        print(f"continuous / static tokens/s (mixed load): {summary['continuous_over_static']:.2f}")
    if "continuous-resident" in by_name and "continuous-single" in by_name:
        summary["resident_mixed_over_single"] = (by_name["continuous-resident"]["tokens_per_s"]
                                                 / by_name["continuous-single"]["tokens_per_s"])
        print(f"mixed-adapter (all resident) / single-adapter tokens/s: {summary['resident_mixed_over_single']:.2f}")
    if "continuous-mixed" in by_name and "continuous-single" in by_name:
        summary["mixed_over_single"] = (by_name["continuous-mixed"]["tokens_per_s"]
                                        / by_name["continuous-single"]["tokens_per_s"])
        print(f"mixed-adapter / single-adapter tokens/s (continuous): {summary['mixed_over_single']:.2f}")
    machine.write_result(summary, "serving", "serve-load" + ("" if args.dtype == "fp32" else f"-{args.dtype}"),
                         args.json)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
