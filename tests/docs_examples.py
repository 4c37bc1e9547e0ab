"""Runs every fenced code block of README.md and docs/**/*.md, so that the docs cannot rot.

    ```python      executed, in order, one namespace per page; cwd is a fresh temporary directory
                   with examples/ linked in, $DELTATUNE_DATA the shared data, HF_HUB_OFFLINE=1
    ```yaml        merged over a minimal run config (MiniLM on SST-2, or SmolLM2 on Alpaca when the
                   block is a causal-LM one) and validated by the real loader; a block that has
                   model: and task: is a complete config and is validated as it is
    ```bash/sh/console
                   every `deltatune ...` line (after an optional `$ `, `\\` continuations joined) is
                   parsed by the real argparse parser, not run, and a config file it names in the
                   repository is loaded with its key=value overrides; make, pip, torchrun, curl, ...
                   lines are counted as shell, not run; any other command is an error
    ```json        must parse (```jsonl: every line)
    ```text        output and other prose, not code (also ```output, ```log, or no language)

A block that cannot run here is preceded by a marker naming why, on the line just above it:

    <!-- docs-test: skip — needs a GPU -->

A marker without a reason is an error. Every error names the file and line of the block.
"""
from __future__ import annotations

import contextlib
import copy
import io
import dataclasses
import json
import os
import re
import shlex
import sys
import tempfile
import traceback
import types
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

PYTHON = {"python", "py"}
YAML = {"yaml", "yml"}
SHELL = {"bash", "sh", "shell", "console", "zsh"}
JSON = {"json", "jsonl"}
NOT_CODE = {"", "text", "txt", "output", "log", "plain", "none"}
# Commands shown in the docs but never run by this test (they install, fetch or start things).
SHELL_NOT_RUN = {"make", "pip", "pip3", "torchrun", "curl", "mlflow", "git", "export", "cd", "tensorboard",
                 "source", "uv", "nvidia-smi", "wandb", "optuna-dashboard"}
PYTHON_SCRIPTS_NOT_RUN = ("benchmarks/", "docs/")   # `python benchmarks/run.py`: shell, not run

MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<directive>[a-z-]+)\s*(?P<rest>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")

BASE_CLASSIFICATION = {
    "model": "minilm", "task": "classification",
    "data": {"train": "../shared/data/sst2/train.jsonl", "eval": "../shared/data/sst2/dev.jsonl",
             "format": "classification", "max_length": 64},
    "method": {"name": "lora"},
    "train": {"max_steps": 2, "batch_size": 8},
    "output_dir": "runs/docs-example",
}
BASE_CAUSAL = {
    "model": "smollm2-135m", "task": "causal-lm",
    "data": {"train": "../shared/data/alpaca/alpaca_en_demo.jsonl", "format": "alpaca", "max_length": 128},
    "method": {"name": "lora"},
    "train": {"max_steps": 2, "batch_size": 2},
    "output_dir": "runs/docs-example",
}
CAUSAL_FORMATS = {"alpaca", "chat", "text", "gsm8k", "verbalized"}


@dataclasses.dataclass
class Block:
    path: Path
    line: int            # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None     # the marker's reason, when skipped
    marker_error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


@dataclasses.dataclass
class PageResult:
    path: Path
    counts: dict = dataclasses.field(default_factory=dict)
    skipped: list = dataclasses.field(default_factory=list)    # (where, language, reason)
    failures: list = dataclasses.field(default_factory=list)   # one line each

    def count(self, kind: str, n: int = 1) -> None:
        if n:
            self.counts[kind] = self.counts.get(kind, 0) + n


def pages() -> list[Path]:
    """README.md, then every Markdown page under docs/, in a stable order."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


# ------------------------------------------------------------------------------ parsing
def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        language = info.split()[0].lower().lstrip(".").strip("{}") if info else ""
        start = i
        body = []
        i += 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                break
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        skip, marker_error = _marker(lines, start, path)
        out.append(Block(path, start + 1, language, "\n".join(body) + "\n", skip, marker_error))
    return out


def _marker(lines: list[str], fence_index: int, path: Path) -> tuple[str | None, str | None]:
    """The docs-test marker on the nearest non-blank line above the fence: (reason, error)."""
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0:
        return None, None
    match = MARKER.match(lines[j])
    if not match:
        return None, None
    where = f"{path.relative_to(REPO)}:{j + 1}"
    if match["directive"] != "skip":
        return None, f"{where}: unknown docs-test marker {match['directive']!r} (expected: skip — REASON)"
    reason = match["rest"].lstrip("—–-:").strip()
    if not reason:
        return None, f"{where}: docs-test skip needs a reason (<!-- docs-test: skip — needs a GPU -->)"
    return reason, None


# ------------------------------------------------------------------------------ running
@contextlib.contextmanager
def page_environment():
    """A fresh working directory with examples/ linked in, and the docs' environment."""
    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="deltatune-docs-") as tmp:
        os.symlink(REPO / "examples", Path(tmp) / "examples")
        os.environ.update(DELTATUNE_DATA=str(SHARED_DATA), HF_HUB_OFFLINE="1",
                          TOKENIZERS_PARALLELISM="false")
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)


@contextlib.contextmanager
def _registered(module: types.ModuleType):
    sys.modules[module.__name__] = module
    try:
        yield
    finally:
        sys.modules.pop(module.__name__, None)


def run_page(path: Path) -> PageResult:
    result = PageResult(path)
    module = types.ModuleType("docs_page")  # a real module: dataclasses and pickle look it up
    namespace = module.__dict__
    python_failed = False
    with page_environment(), _registered(module):
        for block in blocks(path):
            if block.marker_error:
                result.failures.append(block.marker_error)
                continue
            kind = _kind(block)
            if kind is None:
                result.failures.append(f"{block.where}: unknown code block language {block.language!r} "
                                       "(python, yaml, bash, console, json or text)")
                continue
            if kind == "text":
                result.count("text")
                continue
            if block.skip is not None:
                result.count(f"{kind} skipped")
                result.skipped.append((block.where, kind, block.skip))
                continue
            try:
                if kind == "python":
                    if python_failed:  # its names are missing: one failure, not a cascade
                        raise BlockError(f"{block.where}: python block not run: an earlier one on this page failed")
                    python_failed = True
                    _run_python(block, namespace)
                    python_failed = False
                    result.count("python")
                elif kind == "yaml":
                    _check_yaml(block)
                    result.count("yaml")
                elif kind == "json":
                    _check_json(block)
                    result.count("json")
                else:
                    cli, shell = _check_shell(block)
                    result.count("cli", cli)
                    result.count("shell, not run", shell)
            except BlockError as exc:
                result.failures.append(str(exc))
    return result


class BlockError(Exception):
    """One line: the file and line, then what went wrong."""


def _kind(block: Block) -> str | None:
    for kind, names in (("python", PYTHON), ("yaml", YAML), ("shell", SHELL), ("json", JSON),
                        ("text", NOT_CODE)):
        if block.language in names:
            return kind
    return None


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:400]


def _run_python(block: Block, namespace: dict) -> None:
    source = "\n" * block.line + block.code  # line numbers in tracebacks are the file's
    filename = str(block.path.relative_to(REPO))
    try:
        code = compile(source, filename, "exec")
        exec(code, namespace)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a block is a failure too
        if isinstance(exc, KeyboardInterrupt):
            raise
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
        line = frames[-1].lineno if frames else block.line
        raise BlockError(f"{filename}:{line}: python block (line {block.line}) failed: {_one_line(exc)}") from None


# ------------------------------------------------------------------------------ yaml
class _YamlLoader(yaml.SafeLoader):
    """As deltatune reads configs: `3e-4` is a float (YAML 1.1 wants `3.0e-4`)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_for(fragment: dict) -> dict:
    """The run config a YAML block stands for: itself when complete, else merged over a base."""
    if "model" in fragment and "task" in fragment:
        return fragment
    data = fragment.get("data") if isinstance(fragment.get("data"), dict) else {}
    causal = fragment.get("task") == "causal-lm" or data.get("format") in CAUSAL_FORMATS
    base = BASE_CAUSAL if causal else BASE_CLASSIFICATION
    if isinstance(fragment.get("method"), dict) and "name" in fragment["method"]:
        base = {**base, "method": {}}  # another method's options do not mix with the base's
    return _merge(base, fragment)


def validate_config(values: dict, where: str) -> None:
    """Validate with the real loader (read_compare_config when there is a compare: section)."""
    from deltatune.config.run import load_run_config

    with tempfile.TemporaryDirectory(prefix="deltatune-docs-yaml-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        if "compare" in values:
            from deltatune.compare.settings import read_compare_config

            config, _ = read_compare_config(str(path), [])
        else:
            config = load_run_config(path)
        check_method(config)


def check_method(config) -> None:
    """The method options and the quantization, as train/compare check them before loading."""
    if not config.method:  # a comparison without `method:`: the methods come from compare
        return
    try:
        from deltatune.methods import method_config_for
    except ImportError:
        config.method_config()
    else:
        method_config_for(config)


def _check_yaml(block: Block) -> None:
    from deltatune.errors import DeltatuneError

    try:
        fragment = yaml.load(block.code, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        raise BlockError(f"{block.where}: yaml block does not parse: {_one_line(exc)}") from None
    if not isinstance(fragment, dict):
        raise BlockError(f"{block.where}: yaml block is not a mapping of run-config keys")
    try:
        validate_config(config_for(fragment), block.where)
    except DeltatuneError as exc:
        raise BlockError(f"{block.where}: yaml block is not a valid run config: {exc}") from None


def _check_json(block: Block) -> None:
    texts = [line for line in block.code.splitlines() if line.strip()] if block.language == "jsonl" else [block.code]
    for text in texts:
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise BlockError(f"{block.where}: {block.language} block does not parse: {exc}") from None


# ------------------------------------------------------------------------------ shell
def commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line, argv) of each command: `$ ` prompts (console: only those lines), `\\` continuations
    and quotes spanning lines joined, comments dropped."""
    lines = block.code.splitlines()
    out = []
    i = 0
    while i < len(lines):
        line, start = lines[i], i
        i += 1
        stripped = line.strip()
        if block.language == "console":
            if not stripped.startswith("$ "):
                continue  # output
            stripped = stripped[2:]
        elif stripped.startswith("$ "):
            stripped = stripped[2:]
        if not stripped or stripped.startswith("#"):
            continue
        text = stripped
        while True:
            if text.endswith("\\") and i < len(lines):
                text = text[:-1] + " " + lines[i].strip().removeprefix("> ")
                i += 1
                continue
            try:
                argv = shlex.split(text, comments=True)
            except ValueError:  # a quote closes on a later line
                if i < len(lines):
                    text += "\n" + lines[i]
                    i += 1
                    continue
                raise BlockError(f"{block.where}: unbalanced quotes in {stripped!r}") from None
            break
        if argv:
            out.append((block.line + 1 + start, argv))
    return out


def _check_shell(block: Block) -> tuple[int, int]:
    cli = shell = 0
    for line, argv in commands(block):
        where = f"{block.path.relative_to(REPO)}:{line}"
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # VAR=value deltatune ...
            argv = argv[1:]
        if not argv:
            shell += 1
            continue
        program = Path(argv[0]).name
        if program == "deltatune":
            check_cli(argv[1:], where)
            cli += 1
        elif program in ("python", "python3") and argv[1:3] == ["-m", "deltatune.cli"]:
            check_cli(argv[3:], where)
            cli += 1
        elif program == "torchrun" and "deltatune.cli" in argv:
            check_cli(argv[argv.index("deltatune.cli") + 1:], where)
            cli += 1
        elif program in SHELL_NOT_RUN:
            shell += 1
        elif program in ("python", "python3") and len(argv) > 1 and argv[1].startswith(PYTHON_SCRIPTS_NOT_RUN):
            shell += 1
        else:
            raise BlockError(f"{where}: {argv[0]!r} is neither a deltatune command nor a known shell "
                             f"command ({', '.join(sorted(SHELL_NOT_RUN))}, python benchmarks/...)")
    return cli, shell


def check_cli(argv: list[str], where: str) -> None:
    """Parse with the real parser; a config file in the repository is loaded with its overrides."""
    from deltatune.cli import parse_args
    from deltatune.errors import DeltatuneError

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # --help prints; the check is quiet
            args = parse_args(argv)
    except DeltatuneError as exc:
        raise BlockError(f"{where}: deltatune {' '.join(argv)}: {exc}") from None
    except SystemExit as exc:  # --help
        if exc.code not in (0, None):
            raise BlockError(f"{where}: deltatune {' '.join(argv)}: exit {exc.code}") from None
        return
    config = getattr(args, "config", None)
    if not config or not config.endswith((".yaml", ".yml")):
        return
    path = REPO / config
    if config.startswith("examples/") and not path.is_file():
        raise BlockError(f"{where}: {config}: no such file in the repository")
    if not path.is_file():
        return
    try:
        if args.command in ("compare", "plan"):
            from deltatune.compare.settings import read_compare_config

            loaded, _ = read_compare_config(str(path), list(getattr(args, "overrides", None) or []))
        else:
            from deltatune.config.run import load_run_config

            loaded = load_run_config(path, list(getattr(args, "overrides", None) or []))
        check_method(loaded)
    except DeltatuneError as exc:
        raise BlockError(f"{where}: deltatune {' '.join(argv)}: {exc}") from None


def summarize(results: list[PageResult]) -> tuple[dict, list, list]:
    totals: dict = {}
    skipped, failures = [], []
    for result in results:
        for kind, n in result.counts.items():
            totals[kind] = totals.get(kind, 0) + n
        skipped += result.skipped
        failures += result.failures
    return totals, skipped, failures
