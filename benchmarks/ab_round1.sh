#!/bin/bash
# Round-1 code (535a03a) vs this checkout, alternated, each run its own process under the lock:
#   git archive 535a03a | (mkdir -p /tmp/old535 && tar -x -C /tmp/old535)
#   ln -sfn "$PWD/../shared" /tmp/shared        # the round-1 benchmark reads ../shared/data
#   flock /tmp/deltatune-heavy.lock bash benchmarks/ab_round1.sh old,new,old,new 14
# old: the round-1 benchmark with its own defaults (bf16 autocast, frozen weights fp32);
# new: this checkout's benchmarks/sft_run.py with its defaults (bf16: auto, frozen_bf16).
# NEW_ARGS: extra sft_run.py arguments for the new runs only (e.g. NEW_ARGS="--compile true");
# `compile` in the list is a new run with train.compile on (old,new,compile,...).
# Each run prints one JSON line (real_tokens_per_s, cpu_utilization, peak_rss_gb, losses).
OLD=${OLD:-/tmp/old535}
NEW=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1
for who in ${1//,/ }; do
  echo "== $who $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  dir=$([ "$who" = old ] && echo "$OLD" || echo "$NEW")
  extra=$([ "$who" = old ] || echo "$NEW_ARGS")
  [ "$who" = compile ] && extra="$extra --compile true"
  (cd "$dir" && PYTHONPATH="$dir/src" timeout 300 "$PY" benchmarks/sft_run.py deltatune --steps "${2:-14}" --warmup 2 $extra | tail -1)
done
