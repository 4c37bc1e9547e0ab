"""Where a QLoRA / LoRA training step's memory goes (glibc, Linux):

    python benchmarks/memory/qlora_heap_trace.py MODEL QUANTIZE BATCH MAX_LENGTH STEPS
    python benchmarks/memory/qlora_heap_trace.py /tmp/llama3b-nf4 nf4 2 128 4

Trains as `qlora.py train` does (same rows, LoRA, bf16) while a thread samples VmRSS and glibc's
mallinfo2 every 2 ms, tagged by the layer running (forward / backward hooks); prints RSS and the
heap (arena, in use, kept free, mmapped chunks; GiB) after loading, after each step, and at the peak.
"""
import ctypes, json, sys, threading, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S
import torch
import qlora as Q

class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI2
def mi():
    m = libc.mallinfo2(); return {k: round(getattr(m, k) / 2**30, 3) for k in ("arena", "hblkhd", "uordblks", "fordblks")}
def rss():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * 4096 / 2**30
model_dir, quant, batch, length, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
class A: pass
args = A(); args.model = model_dir; args.quantize = quant; args.dtype = "bf16"; args.method = "lora"
args.steps = steps; args.batch = batch; args.max_length = length
import deltatune as dt
from deltatune.training.loop import train as train_loop
model, tok = Q.load(args)
base = rss(); print("after load", round(base, 3), mi(), flush=True)
dataset = S.load_examples(tok, length)
phase = ["load"]; best = [0, None, None]; stop = [False]; per_step = {}
def sampler():
    while not stop[0]:
        r = rss()
        if r > best[0]: best[:] = [r, phase[0], mi()]
        key = phase[0].split(" ")[0]
        per_step[key] = max(per_step.get(key, 0), r)
        time.sleep(0.002)
step = [0]
def fh(i):
    def h(m, a, o): phase[0] = f"s{step[0]} fwd-done-layer{i}"
    return h
def bh(i):
    def h(m, gi, go): phase[0] = f"s{step[0]} bwd-done-layer{i}"
    return h
with tempfile.TemporaryDirectory() as out:
    config = Q.run_config(args, out)
    dt.apply(model, dt.config_from_dict(config.method))
    for i, l in enumerate(model.model.layers):
        l.register_forward_hook(fh(i)); l.register_full_backward_hook(bh(i))
    model.model.norm.register_forward_hook(lambda m, a, o: phase.__setitem__(0, f"s{step[0]} head+loss"))
    ends = []
    def on_step(s):
        ends.append(time.perf_counter())
        step[0] += 1; phase[0] = f"s{step[0]} optimizer/after"
        print("step", step[0], "rss", round(rss(), 3), mi(), flush=True)
    t = threading.Thread(target=sampler, daemon=True); t.start()
    train_loop(model, tok, config, train_dataset=dataset, on_step=on_step)
    stop[0] = True; t.join()
print("step_s", [round(b - a, 2) for a, b in zip(ends, ends[1:])])
print("PEAK", round(best[0], 3), "growth", round(best[0] - base, 3), best[1], best[2])
