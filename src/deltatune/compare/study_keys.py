"""What a comparison's studies depend on: a rerun whose key matches continues the study; one
whose key differs is another study. Paths inside the output directory are written relative to
it and the data files by their content, so a --join worker whose output directory is at another
path (another machine) computes the same key."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deltatune.compare.jobs import Job, fingerprint, portable
from deltatune.compare.search import trials_for


def search_key(row: str, search: dict, base: dict, seed: int, out_dir: Path) -> dict:
    """What a method's search trials depend on."""
    def digest(path: str) -> str:  # the search's own small slices, whole
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    base = {**base, "output_dir": None}
    return portable({"row": row, "space": search["spaces"].get(row), "grid": search["grids"].get(row),
                     "trials": trials_for(search, row), "steps": search["steps"], "rows": search["rows"],
                     "heldout_rows": search["heldout_rows"], "pruner": search["pruner"], "seed": seed,
                     "config": base, "fit": digest(base["data"]["train"]),
                     "heldout": digest(base["data"]["eval"])}, out_dir)


def final_key(jobs: dict[tuple, Job], out_dir: Path) -> dict:
    """The final study's key: every job's run config, path-independent as search_key's (the
    training and eval files by their content fingerprint, not their path)."""
    key = {}
    for job in jobs.values():
        values = json.loads(json.dumps(job.values, default=str))
        for field in ("train", "eval"):
            path = values["data"].get(field)
            if path and not str(path).startswith("hf:") and Path(path).exists():
                values["data"][field] = fingerprint(path)
        key[job.id] = values
    return portable({"jobs": key}, out_dir)
