"""The Launch page's server side: a form -> a run config file -> `deltatune plan` / `train` /
`compare` in a child process (the CLI's own code path), which the page can follow and stop.

Every problem with the form comes back as {field: one-line message}, shown next to that field;
the config is checked by the same validation `deltatune train` runs, so the page and the CLI
never disagree about what is valid.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltatune.errors import DeltatuneError

UI_DIR = ".ui"  # configs and logs of launched jobs, inside the runs folder (hidden from the list)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The options the form offers, per method (the rest keep the method's defaults).
METHOD_OPTIONS = {"full": [], "lora": ["r", "alpha", "target_modules", "init"], "adapter": ["bottleneck_size"],
                  "prompt": ["num_virtual_tokens"], "ptuning": ["num_virtual_tokens"],
                  "prefix": ["num_virtual_tokens"],
                  "oft": ["target_modules"], "boft": ["target_modules"],
                  "loha": ["r", "alpha", "target_modules"], "lokr": ["r", "alpha", "target_modules"],
                  "vera": ["r", "target_modules"], "adalora": ["alpha", "target_modules"],
                  "ln-tuning": [], "bitfit": []}
INTEGERS = ["r", "bottleneck_size", "num_virtual_tokens", "max_steps", "batch_size", "max_length",
            "max_train_rows", "eval_every"]
NUMBERS = ["alpha", "epochs", "lr", "loraplus_lr_ratio"]
LORAPLUS_METHODS = ("lora", "dora")  # the form's LoRA+ ratio goes to these (train.loraplus_lr_ratio)
# A config key (as validation errors name it) -> the form field it came from.
FIELD_OF_KEY = {"model": "model", "task": "task", "output_dir": "name", "data.train": "train",
                "data.eval": "eval", "data.format": "format", "data.max_length": "max_length",
                "data.max_train_rows": "max_train_rows", "data.label_names": "label_names",
                "num_labels": "label_names", "method.name": "method", "method": "method",
                "compare.methods": "methods", "train.max_steps": "max_steps", "train.epochs": "epochs",
                "train.batch_size": "batch_size", "train.lr": "lr", "train.eval_every": "eval_every",
                "train.loraplus_lr_ratio": "loraplus_lr_ratio"}
STOP_GRACE_S = 5.0


class FormError(DeltatuneError):
    """Bad form input: {field: message}; "" is the form as a whole."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k or 'form'}: {v}" for k, v in errors.items()))
        self.errors = errors


def field_of(message: str) -> str:
    """The form field a validation message is about ("LoraConfig.r: must be ..." -> "r")."""
    key = message.split(":", 1)[0].strip()
    if re.fullmatch(r"[A-Za-z]+Config\.\w+", key):
        return key.split(".", 1)[1]
    return FIELD_OF_KEY.get(key, "")


def _number(form: dict, name: str, errors: dict, whole: bool) -> float | int | None:
    text = str(form.get(name) if form.get(name) is not None else "").strip()
    if not text:
        return None
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        errors[name] = f"must be a {'whole ' if whole else ''}number, got {text!r}"
        return None
    if value <= 0:
        errors[name] = f"must be > 0, got {text}"
    return value


def _check_model(model: str) -> str | None:
    from deltatune.models import PRESETS

    if model in PRESETS:
        return None
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file() or path.is_file() and path.suffix == ".gguf":
        return None
    if path.exists():
        return f"{model}: neither a transformers directory (no config.json) nor a .gguf file"
    return f"{model!r}: not a preset ({', '.join(PRESETS)}) nor a local model directory"


def _data_path(value: str, name: str, errors: dict, required: bool) -> str | None:
    from deltatune.config.run import HUB_PREFIX, resolve_data_path

    value = (value or "").strip()
    if not value:
        if required:
            errors[name] = "required: a .jsonl/.json/.csv/.tsv/.parquet/.txt file"
        return None
    try:
        path = resolve_data_path(value, Path.cwd())
    except DeltatuneError as exc:
        errors[name] = str(exc)
        return None
    if not value.startswith(HUB_PREFIX) and not Path(path).is_file():
        errors[name] = f"{value}: file not found"
    return path


def config_from_form(form: dict, runs_root: Path, busy: set[str] = frozenset()) -> tuple[str, dict]:
    """(kind, the run config as a dict) for a form, or FormError with every message found."""
    errors: dict[str, str] = {}
    kind = form.get("kind") or "train"
    if kind not in ("train", "compare"):
        errors["kind"] = f"must be train or compare, got {kind!r}"
    name = str(form.get("name") or "").strip()
    if not NAME.match(name):
        errors["name"] = "letters, digits, '.', '_' or '-' (e.g. sst2-lora)"
    elif name in busy:
        errors["name"] = f"{name}: a launched job is still writing there"
    elif (runs_root / name).exists() and not form.get("overwrite"):
        errors["name"] = f"{name}: already exists in the runs folder; pick another name or tick 'replace'"
    model = str(form.get("model") or "").strip()
    problem = _check_model(model) if model else "required: a preset or a local model directory"
    if problem:
        errors["model"] = problem
    numbers = {n: _number(form, n, errors, whole=True) for n in INTEGERS}
    numbers.update({n: _number(form, n, errors, whole=False) for n in NUMBERS})
    data = {"train": _data_path(form.get("train"), "train", errors, required=True),
            "eval": _data_path(form.get("eval"), "eval", errors, required=False),
            "format": form.get("format") or "classification"}
    data.update({k: numbers[k] for k in ("max_length", "max_train_rows") if numbers[k]})
    labels = [n.strip() for n in str(form.get("label_names") or "").split(",") if n.strip()]
    if labels:  # index i <-> name: what the playground shows instead of 0, 1, ...
        data["label_names"] = labels
    train = {k: numbers[k] for k in ("max_steps", "epochs", "batch_size", "lr", "eval_every") if numbers[k]}
    if numbers["eval_every"]:
        train["save_every"] = numbers["eval_every"]  # checkpoints to show beside each evaluation
    train["log_every"] = 1
    options = {k: numbers.get(k) for k in ("r", "alpha", "bottleneck_size", "num_virtual_tokens")}
    modules = [m.strip() for m in str(form.get("target_modules") or "").split(",") if m.strip()]
    options["target_modules"] = modules or None
    options["init"] = form.get("init") if form.get("init") not in (None, "", "default") else None
    ratio = numbers["loraplus_lr_ratio"]

    def method_values(method: str) -> dict:
        return {k: options[k] for k in METHOD_OPTIONS.get(method, []) if options[k] is not None}

    values: dict[str, Any] = {"model": model, "task": form.get("task") or "classification",
                              "data": data, "train": train, "output_dir": str(runs_root / name)}
    if kind == "compare":
        methods = form.get("methods") or []
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        if not methods:
            errors["methods"] = "tick at least one method to compare"
        values["method"] = {"name": (methods or ["lora"])[0]}
        per_method = {m: {"method": method_values(m)} for m in methods if method_values(m)}
        for m in methods:  # LoRA+ only where it applies: another method would refuse the key
            if ratio and m in LORAPLUS_METHODS:
                per_method.setdefault(m, {})["train"] = {"loraplus_lr_ratio": ratio}
        values["compare"] = {"methods": methods, "per_method": per_method}
    else:
        method = form.get("method") or "lora"
        values["method"] = {"name": method, **method_values(method)}
        if ratio:
            train["loraplus_lr_ratio"] = ratio
    if errors:
        raise FormError(errors)
    return kind, values


def write_config(form: dict, runs_root: Path, busy: set[str] = frozenset()) -> tuple[str, Path, dict]:
    """Validate the form as `deltatune train/compare` would and write its config file."""
    from deltatune.compare.settings import read_compare_config
    from deltatune.config.run import load_run_config
    from deltatune.methods import method_config_for

    kind, values = config_from_form(form, runs_root, busy)
    path = runs_root / UI_DIR / f"{form['name'].strip()}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    try:
        read_compare_config(str(path), []) if kind == "compare" else method_config_for(load_run_config(path))
    except DeltatuneError as exc:
        message = str(exc)
        raise FormError({field_of(message): message}) from None
    return kind, path, values


def plan(form: dict, runs_root: Path, busy: set[str] = frozenset()) -> list[dict]:
    """`deltatune plan`'s prediction for the form, computed in a child process (its baseline is
    a fresh process's memory, as the run's will be)."""
    kind, path, values = write_config(form, runs_root, busy)
    methods = values["compare"]["methods"] if kind == "compare" else [values["method"]["name"]]
    command = [sys.executable, "-m", "deltatune.ui.launch", "plan", str(path), ",".join(methods)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=_child_env())
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        message = lines[-1].removeprefix("deltatune: error: ") if lines else f"exit code {result.returncode}"
        raise FormError({field_of(message): message})
    return json.loads(result.stdout.strip().splitlines()[-1])


def _plan_child(config_path: str, methods: str) -> None:
    """In the child: the plans as one JSON line on stdout (errors: one line on stderr, exit 2)."""
    from deltatune.compare.plan import plan_methods
    from deltatune.compare.settings import read_compare_config

    mb = 1024 * 1024
    config, settings = read_compare_config(config_path, [])
    plans = plan_methods(config, methods.split(","), settings["per_method"])
    print(json.dumps([{"method": p.method, "trainable_params": p.trainable_params,
                       "trainable_percent": 100 * p.trainable_share,
                       "predicted_peak_mb": p.predicted_peak_bytes / mb,
                       "predicted_file_mb": p.predicted_file_bytes / mb,
                       "activation_mb": p.activation_bytes / mb,
                       "baseline_mb": p.baseline_bytes / mb} for p in plans]))


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Job:
    id: str
    kind: str
    name: str
    command: list[str]
    log: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    ended: float | None = None
    stopping: bool = False

    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "stopping" if self.stopping else "running"
        self.ended = self.ended or time.time()
        if self.stopping:
            return "stopped"
        return "finished" if code == 0 else "failed"

    def tail(self, lines: int = 12) -> list[str]:
        """The log's last lines; a progress bar's carriage-return updates count as lines."""
        try:
            with open(self.log, "rb") as handle:
                handle.seek(max(0, self.log.stat().st_size - 8192))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line for line in re.split(r"[\r\n]+", text) if line.strip()][-lines:]

    def to_dict(self) -> dict[str, Any]:
        state = self.state()
        tail = self.tail()
        error = next((line.removeprefix("deltatune: error: ") for line in reversed(tail)
                      if line.startswith("deltatune: error:")), None)
        if state == "failed" and error is None and tail:
            error = tail[-1]
        return {"id": self.id, "kind": self.kind, "name": self.name, "state": state,
                "run": self.name, "started": self.started, "ended": self.ended,
                "command": " ".join(self.command[2:]), "log": tail, "error": error}


class Jobs:
    """The children this page started: `deltatune train|compare CONFIG` each, in its own
    process group (a comparison's own children stop with it)."""

    def __init__(self, runs_root: Path) -> None:
        self.root = Path(runs_root)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def busy(self) -> set[str]:
        return {j.name for j in self.jobs.values() if j.state() in ("running", "stopping")}

    def plan(self, form: dict) -> list[dict]:
        return plan(form, self.root, self.busy())

    def start(self, form: dict) -> dict:
        with self.lock:
            kind, path, _ = write_config(form, self.root, self.busy())
            name = form["name"].strip()
            command = [sys.executable, "-m", "deltatune.cli", kind, str(path)]
            if form.get("overwrite"):
                command.append("--overwrite")
            log = self.root / UI_DIR / f"{name}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=_child_env(),
                                           start_new_session=True)
            job = Job(id=f"{name}-{int(time.time() * 1000)}", kind=kind, name=name,
                      command=command, log=log, process=process)
            self.jobs[job.id] = job
            return job.to_dict()

    def list(self) -> list[dict]:
        return [j.to_dict() for j in sorted(self.jobs.values(), key=lambda j: -j.started)]

    def stop(self, job_id: str) -> dict:
        """Ctrl-C to the job's process group (the run stops as an interrupted CLI run does,
        leaving its checkpoints for --resume); killed if still there after STOP_GRACE_S."""
        job = self.jobs.get(job_id)
        if job is None:
            raise DeltatuneError(f"no job {job_id!r}")
        if job.process.poll() is None:
            job.stopping = True
            _signal_group(job.process, signal.SIGINT)
            threading.Thread(target=_kill_later, args=(job.process,), daemon=True).start()
        return job.to_dict()

    def shutdown(self) -> None:
        for job in self.jobs.values():
            if job.process.poll() is None:
                job.stopping = True
                _signal_group(job.process, signal.SIGINT)
        for job in self.jobs.values():
            _kill_later(job.process)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def _kill_later(process: subprocess.Popen) -> None:
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "plan":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _plan_child(sys.argv[2], sys.argv[3])
    except DeltatuneError as exc:
        print(f"deltatune: error: {exc}", file=sys.stderr)
        sys.exit(2)
