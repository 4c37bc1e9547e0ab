"""The repository speaks of the project alone: no file (text or image bytes) and no file name
says how the work was organised (round or issue numbers, labels of who did what)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# built from parts so that this file does not match itself
WORDS = re.compile("|".join([r"\bround [0-9]", r"\bissue [0-9]", r"\bh[0-9]{2}\b", "the " + "lead",
                             "engine" + "ers"]).encode(), re.I)


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): every file under the root
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def test_no_file_or_file_name_speaks_of_how_the_work_was_organised():
    hits = []
    for path in tracked_files():
        if path.suffix == ".lock" or not path.is_file():
            continue  # lock files hold hashes: random hex
        relative = str(path.relative_to(ROOT))
        if WORDS.search(relative.encode()):
            hits.append(f"{relative} (its name)")
        elif match := WORDS.search(path.read_bytes()):
            hits.append(f"{relative}: {match.group().decode(errors='replace')!r}")
    assert not hits, "\n".join(hits)
