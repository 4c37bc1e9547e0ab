"""The per-machine matmul probe behind `train.bf16: auto`: auto never picks the measured-slower
precision, `bf16: true` on a slow-bf16 machine warns, the cache is used and a corrupt one is
re-measured, and `deltatune inspect --hardware` shows it all. The probe itself is stubbed (its
timings are the machine's, not the test's), except in one test that runs it for real."""
from __future__ import annotations

import json
import math

import pytest
import torch

from deltatune.cli import main
from deltatune import hardware
from deltatune.training.loop import train_from_config
from deltatune.training.optimization import resolve_bf16
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import classification_config, tiny_bert_dir

CPU = torch.device("cpu")


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A stubbed probe with settable figures, counting its calls; the cache in tmp_path."""
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path / "cache"))

    class Stub:
        fp32, bf16, calls = 100.0, 400.0, 0

        def __call__(self, device):
            self.calls += 1
            return {"fp32_gflops": self.fp32, "bf16_gflops": self.bf16}

    stub = Stub()
    monkeypatch.setattr(hardware, "measure_matmul", stub)
    return stub


@pytest.mark.parametrize("fp32, bf16", [(100.0, 400.0), (100.0, 0.8), (100.0, 95.0), (100.0, 119.0),
                                        (100.0, 121.0), (47.0, 0.1), (400.0, 2700.0)])
def test_auto_never_picks_the_slower_precision(probe, fp32, bf16):
    probe.fp32, probe.bf16 = fp32, bf16
    picked = resolve_bf16("auto", CPU)
    assert picked == (bf16 >= hardware.BF16_MARGIN * fp32)
    assert not (picked and bf16 < fp32)       # never bf16 where bf16 measured slower
    assert picked or bf16 < 1.5 * fp32        # never fp32 where bf16 is clearly faster
    assert resolve_bf16(True, CPU) is True and resolve_bf16(False, CPU) is False


def test_explicit_settings_do_not_probe(probe):
    resolve_bf16(True, CPU), resolve_bf16(False, CPU)
    assert probe.calls == 0


def test_cuda_auto_asks_the_gpu(probe, monkeypatch):
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert resolve_bf16("auto", torch.device("cuda")) is supported
    assert probe.calls == 0


def test_the_cache_is_used_and_keyed_by_thread_count(probe, monkeypatch):
    first = hardware.machine_profile(CPU)
    probe.fp32 = 1.0  # a re-probe would now give a different answer
    second = hardware.machine_profile(CPU)
    assert probe.calls == 1 and not first["cached"] and second["cached"]
    assert second["fp32_gflops"] == first["fp32_gflops"] == 100.0
    path = hardware.cache_path(CPU, torch.get_num_threads())
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 3)
    assert hardware.machine_profile(CPU)["fp32_gflops"] == 1.0 and probe.calls == 2
    assert hardware.machine_profile(CPU, refresh=True)["cached"] is False and probe.calls == 3


@pytest.mark.parametrize("content", ["{not json", "[]", '{"fp32_gflops": 100}',
                                     '{"fp32_gflops": -1, "bf16_gflops": 5}',
                                     '{"fp32_gflops": "fast", "bf16_gflops": 5}', ""])
def test_a_corrupt_cache_is_measured_again_and_rewritten(probe, content):
    path = hardware.cache_path(CPU, torch.get_num_threads())
    path.parent.mkdir(parents=True)
    path.write_text(content)
    profile = hardware.machine_profile(CPU)
    assert probe.calls == 1 and profile["cached"] is False and profile["bf16_gflops"] == 400.0
    assert json.loads(path.read_text())["fp32_gflops"] == 100.0
    hardware.machine_profile(CPU)
    assert probe.calls == 1


def test_bf16_true_where_bf16_is_slow_warns_once_in_the_run_log(probe, tmp_path, capsys):
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=16, max_steps=2)
    probe.fp32, probe.bf16 = 50.0, 0.5
    summary = train_from_config(str(config), [f"output_dir={tmp_path / 'slow'}", "train.bf16=true"])
    printed = capsys.readouterr()
    warnings = [line for line in (printed.out + printed.err).splitlines() if "train.bf16 is true" in line]
    assert summary["bf16"] is True and len(warnings) == 1
    assert "100.0x slower" in warnings[0] and "train.bf16=auto" in warnings[0]
    probe.bf16 = 500.0  # where bf16 is fast, the same setting is silent
    hardware.machine_profile(CPU, refresh=True)
    train_from_config(str(config), [f"output_dir={tmp_path / 'fast'}", "train.bf16=true", "train.max_steps=1"])
    assert "train.bf16 is true" not in "".join(capsys.readouterr())


def test_auto_in_a_run_follows_the_probe(probe, tmp_path):
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=16, max_steps=1)
    probe.fp32, probe.bf16 = 50.0, 0.5
    assert train_from_config(str(config), [f"output_dir={tmp_path / 'a'}", "train.bf16=auto"])["bf16"] is False
    probe.bf16 = 500.0  # measured again (as `inspect --hardware --refresh` does): bf16 is now fast
    hardware.machine_profile(CPU, refresh=True)
    assert train_from_config(str(config), [f"output_dir={tmp_path / 'b'}", "train.bf16=auto"])["bf16"] is True


def test_inspect_hardware_prints_flags_peaks_and_the_choice(probe, capsys, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ["avx2", "avx512_bf16"])
    capsys.readouterr()
    assert main(["inspect", "--hardware"]) == 0
    out = capsys.readouterr().out
    assert "avx2 avx512_bf16" in out and "100.0 GFLOP/s" in out and "400.0 GFLOP/s" in out
    assert "-> bf16" in out and "4.00x fp32" in out
    probe.bf16 = 10.0
    assert main(["inspect", "--hardware", "--refresh", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bf16_auto"] is False and report["bf16_gflops"] == 10.0 and probe.calls == 2
    assert main(["inspect"]) == 2 and "--hardware" in capsys.readouterr().err


def test_the_real_probe_measures_both_precisions(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hardware, "CPU_SIZES", (64, 128))  # the machine's timing, kept short
    profile = hardware.machine_profile(CPU)
    for key in ("fp32_gflops", "bf16_gflops"):
        assert math.isfinite(profile[key]) and profile[key] > 0
    assert profile["threads"] == torch.get_num_threads() and profile["flags"] == hardware.cpu_flags()
    assert hardware.machine_profile(CPU)["cached"] is True


def test_serve_dtype_auto_follows_the_probe(probe):
    """`deltatune serve --dtype auto` asks the same probe as training: never bf16 where it is slow."""
    from deltatune.cli import build_parser
    from deltatune.errors import DeltatuneError
    from deltatune.serving.server import serving_dtype

    assert build_parser().parse_args(["serve", "--model", "m"]).dtype == "fp32"  # outputs as before
    probe.fp32, probe.bf16 = 47.0, 0.1  # an AVX2-only machine: bf16 emulated
    assert serving_dtype("auto", CPU) is torch.float32
    probe.bf16 = 300.0
    hardware.machine_profile(CPU, refresh=True)
    assert serving_dtype("auto", CPU) is torch.bfloat16
    assert serving_dtype("fp32", CPU) is torch.float32 and serving_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(DeltatuneError, match="--dtype: expected fp32, bf16 or auto"):
        serving_dtype("float8", CPU)
