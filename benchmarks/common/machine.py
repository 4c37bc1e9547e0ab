"""The machine a benchmark runs on, and where its raw result goes.

Results are named by date and CPU kind: benchmarks/results/<topic>/<date>-<name>-<kind>.json,
e.g. results/serving/2026-12-03-serve-load-amd-avx512bf16.json. The CPU kind is the vendor and
the widest matrix unit torch can use: `amx` (Intel AMX tiles), `avx512bf16` (AVX512-bf16 without
AMX) or `avx2`. The CPU flags recorded beside every figure are the ones that decide that:

    grep -o -w 'avx512_bf16\\|amx_tile\\|avx2' /proc/cpuinfo | sort -u
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
RESULTS = BENCHMARKS / "results"
ROOT = BENCHMARKS.parent
FLAGS = ("amx_tile", "avx2", "avx512_bf16")


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


def cpu_flags() -> list[str]:
    """The CPU flags that decide the matmul path (sorted): amx_tile, avx2, avx512_bf16."""
    return sorted(set(_cpuinfo().split()) & set(FLAGS))


def cpu_kind(flags: list[str] | None = None, vendor: str | None = None) -> str:
    """`intel-amx`, `amd-avx512bf16`, `intel-avx2`, ...: the vendor and the widest matrix unit."""
    flags = cpu_flags() if flags is None else flags
    if vendor is None:
        text = _cpuinfo()
        vendor = "amd" if "AuthenticAMD" in text else "intel" if "GenuineIntel" in text else \
            (platform.machine() or "cpu").lower()
    unit = "amx" if "amx_tile" in flags else "avx512bf16" if "avx512_bf16" in flags else \
        "avx2" if "avx2" in flags else "base"
    return f"{vendor}-{unit}"


def describe() -> str:
    """One line: CPU model, cores, matrix units, memory; Python and the measured libraries."""
    from importlib import metadata

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name"))
    except (StopIteration, OSError):
        cpu = platform.processor() or "unknown CPU"
    memory = ""
    if Path("/proc/meminfo").exists():
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "trl"))
    return (f"{cpu}, {os.cpu_count()} cores (CPU flags: {' '.join(cpu_flags()) or 'none'})"
            f"{memory}; Python {platform.python_version()}, {versions}")


def result_path(topic: str, name: str, date: str | None = None, kind: str | None = None,
                suffix: str = ".json") -> Path:
    """results/<topic>/<date>-<name>-<kind>.json; -2, -3, ... when that measurement exists."""
    date = date or datetime.date.today().isoformat()
    stem = f"{date}-{name}-{kind or cpu_kind()}"
    path, n = RESULTS / topic / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = RESULTS / topic / f"{stem}-{n}{suffix}"
    return path


def gpu_kind(name: str) -> str:
    """A GPU's name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "-".join(re.findall(r"[a-z0-9]+", name.lower())) or "gpu"


def write_result(data: object, topic: str, name: str, path: str | Path | None = None) -> Path:
    """Write one measurement as JSON (default: result_path(topic, name)); returns the path."""
    out = Path(path) if path else result_path(topic, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # never a half-written result
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out
