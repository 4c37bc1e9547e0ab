"""What this machine's matrix units can do, measured once and cached: the fp32 and bf16 matmul
peaks that decide `train.bf16: auto` and that benchmarks divide by for model-FLOPs utilisation.

CPU flags alone do not say whether bf16 pays: with AMX or AVX512-bf16 bf16 matmuls run 2-10x
faster than fp32, but on an AVX2-only CPU they are emulated and can be 100x slower. So a short
probe (about a second) times square products of both precisions at a few sizes, interleaved so a
neighbour's load hits both alike, and the result is cached per CPU model, torch version and
thread count:

    profile = machine_profile(torch.device("cpu"))   # {"fp32_gflops": ..., "bf16_gflops": ...}
    bf16_pays(profile)                               # what `bf16: auto` becomes
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# bf16 autocast also casts weights and activations (memory-bound work the probe does not
# time), so bf16 must beat fp32 by a margin before auto turns it on.
BF16_MARGIN = 1.2
CPU_SIZES = (256, 512, 1024, 2048)
CUDA_SIZES = (2048, 4096, 8192)
SECONDS_PER_POINT = 0.06   # timing window of one (size, precision) point
SLOWEST_PRODUCT_S = 0.2    # a larger size is skipped when one product would take longer
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- facts
def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The matrix-relevant flags this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in FLAGS if f in present]
    return []


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


# ----------------------------------------------------------------------------- the probe
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gflops(n: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(GFLOP/s, seconds of one product) of an n x n @ n x n matmul, after one warm-up product."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    start = time.perf_counter()
    torch.mm(a, b)  # warm-up: packing, kernel selection
    _sync(device)
    first = time.perf_counter() - start
    if first > SLOWEST_PRODUCT_S:  # emulated: one product is the measurement
        return 2 * n ** 3 / first / 1e9, first
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0 or device.type != "cuda":
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= SECONDS_PER_POINT and count >= 2:
                return 2 * n ** 3 * count / elapsed / 1e9, elapsed / count


def measure_matmul(device: torch.device) -> dict[str, float]:
    """Peak GFLOP/s per precision over a few square sizes, at the current thread count."""
    sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    peak = {name: 0.0 for name in PRECISIONS}
    seconds = {name: 0.0 for name in PRECISIONS}  # one product at the last size measured
    with torch.no_grad():
        for index, n in enumerate(sizes):
            for name, dtype in PRECISIONS.items():
                growth = (n / sizes[index - 1]) ** 3 if index else 1.0
                if index and seconds[name] * growth > SLOWEST_PRODUCT_S:
                    continue  # this precision is slow here; a larger product would only cost time
                gflops, seconds[name] = _gflops(n, dtype, device)
                peak[name] = max(peak[name], gflops)
    return {f"{name}_gflops": round(value, 1) for name, value in peak.items()}


# ----------------------------------------------------------------------------- the cache
def cache_dir() -> Path:
    if os.environ.get("DELTATUNE_CACHE_DIR"):
        return Path(os.environ["DELTATUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deltatune"


def cache_path(device: torch.device, threads: int) -> Path:
    digest = hashlib.sha256(_device_name(device).encode()).hexdigest()[:12]
    kind = "cuda" if device.type == "cuda" else "cpu"
    return cache_dir() / f"hardware-{kind}-{digest}-torch{torch.__version__}-{threads}t.json"


def _valid(profile: Any) -> bool:
    if not isinstance(profile, dict):
        return False
    values = [profile.get(f"{name}_gflops") for name in PRECISIONS]
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def _write_atomically(path: Path, profile: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(profile, out, indent=2)
        os.replace(temp, path)
    except OSError:
        pass  # a read-only home: the measurement still holds for this process


def machine_profile(device: torch.device | str = "cpu", refresh: bool = False) -> dict[str, Any]:
    """The measured profile of `device` at the current thread count: from the cache, or
    probed (about a second) and cached. A missing, unreadable or corrupt cache is re-measured."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    path = cache_path(device, threads)
    if not refresh:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = None
        if _valid(cached):
            return {**cached, "cache": str(path), "cached": True}
    profile = {"device": device.type, "name": _device_name(device),
               "flags": cpu_flags() if device.type == "cpu" else [], "threads": threads,
               "torch": torch.__version__, **measure_matmul(device),
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_atomically(path, profile)
    return {**profile, "cache": str(path), "cached": False}


# ----------------------------------------------------------------------------- decisions
def bf16_pays(profile: dict[str, Any]) -> bool:
    """bf16 autocast is worth it: its measured matmul peak beats fp32's by BF16_MARGIN."""
    return profile["bf16_gflops"] >= BF16_MARGIN * profile["fp32_gflops"]


def bf16_auto(device: torch.device) -> bool:
    """`train.bf16: auto`: on CUDA where the GPU supports bf16; on CPU where it is measured faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bf16_pays(machine_profile(device))


def bf16_warning(setting: bool | str, device: torch.device) -> str | None:
    """One line when `train.bf16: true` is set on a CPU where bf16 matmuls measured slower."""
    if setting is not True or device.type != "cpu":
        return None
    profile = machine_profile(device)
    fp32, bf16 = profile["fp32_gflops"], profile["bf16_gflops"]
    if bf16 >= fp32:
        return None
    return (f"warning: train.bf16 is true, but bf16 matmuls are {fp32 / bf16:.1f}x slower than fp32 "
            f"on this CPU ({bf16:,.0f} vs {fp32:,.0f} GFLOP/s measured; flags: "
            f"{' '.join(profile.get('flags') or []) or 'none'}); set train.bf16=auto to pick fp32")


def peak_gflops(bf16: bool, device: torch.device | str = "cpu") -> float:
    """The measured peak at the precision a run computes in: the denominator of MFU."""
    return machine_profile(device)["bf16_gflops" if bf16 else "fp32_gflops"]


def hardware_report(device: torch.device | str = "cpu", refresh: bool = False) -> dict[str, Any]:
    """`deltatune inspect --hardware`: the profile and what `bf16: auto` picks from it."""
    device = torch.device(device)
    profile = machine_profile(device, refresh=refresh)
    return {**profile, "bf16_auto": bf16_auto(device) if device.type == "cuda" else bf16_pays(profile),
            "bf16_margin": BF16_MARGIN}


def format_report(report: dict[str, Any]) -> str:
    flags = " ".join(report.get("flags") or []) or "none of " + " ".join(FLAGS)
    ratio = report["bf16_gflops"] / report["fp32_gflops"]
    source = "cached" if report.get("cached") else "measured now"
    return "\n".join([
        f"device:      {report['name']} ({report['device']}, {report['threads']} threads, "
        f"torch {report['torch']})",
        f"cpu flags:   {flags}" if report["device"] == "cpu" else "cpu flags:   (GPU)",
        f"fp32 peak:   {report['fp32_gflops']:,.1f} GFLOP/s (matmul)",
        f"bf16 peak:   {report['bf16_gflops']:,.1f} GFLOP/s (matmul, {ratio:.2f}x fp32)",
        f"bf16: auto   -> {'bf16' if report['bf16_auto'] else 'fp32'} "
        f"(bf16 when it measures >= {report['bf16_margin']}x fp32)",
        f"probe:       {source} {report.get('measured_at', '')}; {report['cache']}",
    ])
