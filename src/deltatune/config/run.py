"""Run configuration: YAML -> validated dataclasses, `key=value` overrides, nearest-key hints.

    config = load_run_config("examples/sst2-minilm-lora.yaml", ["method.r=16", "train.lr=3e-4"])

Every problem is one DeltatuneError line naming the key (and the file or "command line" it came
from): unknown keys get the nearest valid key suggested, values of the wrong type say what was
expected, impossible values (batch_size 0, schedule "cosin") say what is allowed.

This is the lowest layer: it imports no model, method or quantization code. So two sections stay
as written here and are validated where their meaning lives, by whoever runs the config:
`method:` by the method's own config class and `quantize:` by deltatune.quantization, both in
`deltatune.methods.method_config_for(run_config)` (training/loop.py calls it before loading).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltatune.config.values import ConfigSection, check_type, parse_scalar, read_yaml
from deltatune.errors import DeltatuneError

TASKS = ("classification", "causal-lm")
FORMATS_BY_TASK = {
    "classification": ("classification", "pairs"),
    "causal-lm": ("alpaca", "chat", "text", "gsm8k", "verbalized"),
}
FORMATS = FORMATS_BY_TASK["classification"] + FORMATS_BY_TASK["causal-lm"]
SCHEDULES = ("linear", "cosine", "constant")
METRICS = ("accuracy", "f1", "exact_match", "perplexity")
METRICS_BY_TASK = {"classification": ("accuracy", "f1"), "causal-lm": ("perplexity", "exact_match")}
ON_NAN = ("stop", "skip")
DISTRIBUTED = ("auto", "ddp", "fsdp")
TRACKERS = ("tensorboard", "mlflow", "wandb")  # train.report_to (deltatune.tracking)
ATTENTION = ("auto", "sdpa", "eager")  # train.attention (training/levers.py)
DATA_ENV = "DELTATUNE_DATA"      # where ../shared/data lives on this machine, when set
SHARED_DATA_PREFIX = "../shared/data"
HUB_PREFIX = "hf:"               # data.train: hf:stanfordnlp/sst2 -> a datasets-library Hub name


# ---------------------------------------------------------------------------------- dataclasses
@dataclass
class DataConfig(ConfigSection):
    prefix: typing.ClassVar[str] = "data."

    train: str | None = None        # file (.jsonl .json .csv .tsv .parquet .txt) or hf:NAME
    eval: str | None = None
    format: str = "classification"  # classification | pairs | alpaca | chat | text | gsm8k | verbalized
    text_field: str = "text"        # pairs: "text" (the default) means "text_a"
    text_pair_field: str | None = None  # pairs: None means "text_b"
    label_field: str = "label"
    label_names: list[str] | None = None  # index i <-> name; string labels map through it
    max_length: int = 128           # longer rows are truncated and counted in dataset.stats
    max_train_rows: int | None = None   # first N rows of the train file
    max_eval_rows: int | None = None
    packing: bool = False           # several examples per row (causal-lm formats only)
    train_on_prompt: bool = False   # instruction data: loss on the responses only by default
    # verbalized: classification rows taught to a causal LM as instructions; the prompt is this
    # template filled from the row ("Review: {text}\nPositive or negative?"), the answer is the
    # label's name from label_names; scored by exact match of the generated answer
    prompt_template: str | None = None

    def validate(self) -> None:
        self.one_of("format", FORMATS)
        self.positive("max_length")
        self.positive("max_train_rows", "max_eval_rows", allow_none=True)
        if self.format == "pairs":  # GLUE-style pair files name their columns text_a / text_b
            if self.text_pair_field is None:
                self.text_field = "text_a" if self.text_field == "text" else self.text_field
                self.text_pair_field = "text_b"
        if self.format == "verbalized":
            if not self.prompt_template:
                self.fail("prompt_template", "is required by format verbalized (e.g. 'Review: {text}')")
            if not self.label_names:
                self.fail("label_names", "is required by format verbalized: the answers to teach")
        if self.label_names is not None:
            if len(self.label_names) < 2:
                self.fail("label_names", f"needs at least 2 names, got {self.label_names!r}")
            if len(set(self.label_names)) != len(self.label_names):
                self.fail("label_names", f"has duplicates: {self.label_names!r}")


@dataclass
class TrainConfig(ConfigSection):
    prefix: typing.ClassVar[str] = "train."

    epochs: float = 1               # ignored when max_steps is set
    max_steps: int | None = None
    batch_size: int = 32            # examples per optimizer step = batch_size * grad_accum
    eval_batch_size: int | None = None  # None: same as batch_size
    grad_accum: int = 1
    lr: float | None = None         # None: the method's Method.default_lr
    weight_decay: float = 0.0       # never applied to biases and norms
    # LoRA+ (lora, dora): B's learning rate = ratio x lr (A's); the paper and PEFT suggest ~16.
    # None: one lr for all (plain LoRA)
    loraplus_lr_ratio: float | None = None
    schedule: str = "linear"        # linear | cosine | constant, after warmup
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0   # None: no clipping
    bf16: bool | str = "auto"       # auto: where bf16 matmuls measure faster (`deltatune inspect --hardware`)
    frozen_bf16: bool = True        # under bf16, frozen linear weights stored in bf16 (same products, less memory)
    gradient_checkpointing: bool = False
    # Long sequences (docs/guides/long-context.md); each gives the same loss and gradients:
    checkpoint_bf16: bool = False     # with gradient_checkpointing: each layer's input kept in bf16
    checkpoint_offload: bool = False  # with gradient_checkpointing, CUDA: layer inputs in pinned CPU memory
    loss_chunk_tokens: int = 1024     # labelled positions whose LM-head logits exist at once; 0: all
    mlp_tile_tokens: int = 0          # feed-forward blocks in tiles of this many positions, recomputed in backward; 0: off
    attention: str = "auto"           # auto (as loaded: sdpa where the model has it) | sdpa | eager
    # torch.compile of the norms and SwiGLU MLPs of Llama-family decoders (training/compiled.py):
    # fused elementwise loops; one compilation (~tens of seconds, once per process) serves every
    # token count. Results differ from eager by rounding only.
    compile: bool = False
    group_by_length: bool = True    # batch rows of similar length (less padding; order still random)
    # causal LM on plain-causal decoders (Llama family): a batch is one row of its examples end to
    # end, each attending only to itself; no padding is computed (group_by_length is then moot)
    padding_free: bool = True
    eval_every: int | None = None   # steps; None: only at the end
    save_every: int | None = None   # steps; None: only the final delta
    keep_checkpoints: int = 2
    early_stopping_patience: int | None = None  # evaluations without improvement
    metric: str | None = None       # accuracy | f1 | exact_match | perplexity; None: by task
    seed: int = 0
    log_every: int = 10
    on_nan: str = "stop"            # stop | skip (skip the step, keep going)
    # under torchrun: ddp replicates the model; fsdp shards weights, gradients and optimizer state
    # (torch FSDP2, every transformer layer + the root); auto = ddp
    distributed: str = "auto"
    fsdp_cpu_offload: bool = False  # fsdp on GPUs: sharded parameters and AdamW live in CPU memory
    # where the run's numbers also go: tensorboard | mlflow | wandb (a list), or none.
    # mlflow: MLFLOW_TRACKING_URI, else sqlite:///RUNS/mlflow.db beside output_dir; wandb: WANDB_PROJECT, WANDB_MODE
    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"])

    def validate(self) -> None:
        self.positive("epochs", "batch_size", "grad_accum", "keep_checkpoints", "log_every")
        self.positive("max_steps", "eval_batch_size", "lr", "max_grad_norm", "eval_every",
                      "save_every", "early_stopping_patience", "loraplus_lr_ratio", allow_none=True)
        if self.weight_decay < 0:
            self.fail("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            self.fail("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        self.one_of("schedule", SCHEDULES)
        self.one_of("on_nan", ON_NAN)
        self.one_of("distributed", DISTRIBUTED)
        if self.metric is not None:
            self.one_of("metric", METRICS)
        for key in ("loss_chunk_tokens", "mlp_tile_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self.fail(key, f"must be a whole number >= 0 (0: off), got {value!r}")
        self.one_of("attention", ATTENTION)
        for key in ("checkpoint_bf16", "checkpoint_offload"):
            if getattr(self, key) and not self.gradient_checkpointing:
                self.fail(key, "needs train.gradient_checkpointing: true (it sets how the "
                               "checkpointed layer inputs are kept)")
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            self.fail("bf16", f"must be true, false or auto, got {self.bf16!r}")
        self.report_to = self._trackers(self.report_to)

    def _trackers(self, value: list[str] | str) -> list[str]:
        names = [value] if isinstance(value, str) else list(value)
        if names in (["none"], []):
            return []
        for name in names:
            if name not in TRACKERS:
                near = difflib.get_close_matches(str(name), TRACKERS, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.fail("report_to", f"{name!r} is not a tracker: expected a list of "
                                       f"{' | '.join(TRACKERS)}, or none{hint}")
        if len(set(names)) != len(names):
            self.fail("report_to", f"names a tracker twice: {names!r}")
        return names


@dataclass
class RunConfig:
    model: str                      # preset name, transformers directory, Hub id or .gguf file
    task: str                       # classification | causal-lm
    data: DataConfig
    method: dict                    # as written; deltatune.methods.method_config_for validates it
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = ""
    num_labels: int | None = None   # classification; None: len(data.label_names) or from the data
    compare: dict = field(default_factory=dict)  # `deltatune compare` settings (see compare.py)
    # frozen base quantized by bitsandbytes (QLoRA): none | nf4 | fp4 | int8, or a mapping
    # {type, double_quant, compute_dtype}; PEFT methods only (deltatune.quantization.parse_quantize)
    quantize: str | dict = "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "train": TrainConfig}
_TOP_LEVEL = {"model": str, "task": str, "output_dir": str, "num_labels": int | None}
_REQUIRED = ("model", "task", "data", "method", "output_dir")


# ---------------------------------------------------------------------------------- loading
def valid_keys() -> list[str]:
    """Every dotted key a run config may set (method keys belong to the method)."""
    keys = list(_TOP_LEVEL) + ["data", "method", "train", "method.name", "compare", "quantize"]
    for section, cls in _SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown_key(key: str, source: str) -> DeltatuneError:
    near = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return DeltatuneError(f"{key}: unknown key{hint} [{source}]")


def apply_overrides(raw: dict, overrides: typing.Iterable[str], sources: dict[str, str],
                    full_keys: dict[str, str] | None = None) -> None:
    """Set `a.b=value` (value read as YAML) in the nested dict; records each key's source
    (and, in `full_keys`, the first full override key under each top-level name).

    `method.name=X` naming another method than the file's starts `method:` afresh from X's
    defaults, so `method.name=full` works on a LoRA config without dropping `r:` by hand.
    """
    full_keys = {} if full_keys is None else full_keys
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DeltatuneError(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
        parsed.append((key, parse_scalar(text)))
    file_method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    for key, value in parsed:
        if key in ("method.name", "method.method") and value != file_method.get(
                "name", file_method.get("method")):
            raw["method"] = {}
    for key, value in parsed:
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DeltatuneError(f"{'.'.join(parts[:i + 1])}: is not a section, cannot set "
                                     f"{key} [command line]")
            node = child
        node[parts[-1]] = value
        sources[key] = "command line"
        sources.setdefault(parts[0], "command line")
        full_keys.setdefault(parts[0], key)


def _source(sources: dict[str, str], key: str, default: str) -> str:
    return sources.get(key, default)


def _build_section(cls: type, values: Any, name: str, sources: dict, default_source: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise DeltatuneError(f"{name}: expected a mapping of keys, got {values!r} "
                             f"[{_source(sources, name, default_source)}]")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            dotted = f"{name}.{key}"
            raise _unknown_key(dotted, _source(sources, dotted, default_source))
    return cls(**values)


def build_run_config(raw: dict, source: str = "config", sources: dict | None = None,
                     full_keys: dict | None = None, comparison: bool = False) -> RunConfig:
    """Validate a nested dict (already merged with overrides) into a RunConfig.

    `comparison`: read for `deltatune compare`/`plan`, which train the methods they are told;
    `method:` is then optional (absent: {}; present: options for the method it names).
    """
    sources, full_keys = sources or {}, full_keys or {}
    for key in raw:
        if key not in _TOP_LEVEL and key not in ("data", "method", "train", "compare", "quantize"):
            key = str(key)
            if sources.get(key) == "command line":  # name the whole override: trian.lr
                raise _unknown_key(full_keys.get(key, key), "command line")
            raise _unknown_key(key, source)
    compare = raw.get("compare") or {}
    if not isinstance(compare, dict):
        raise DeltatuneError(f"compare: expected a mapping of keys, got {compare!r} [{source}]")
    if comparison and raw.get("method") is None:
        raw["method"] = {}
    if compare and raw.get("method") is None:  # a comparison config names methods, not one
        raw["method"] = {"name": (compare.get("methods") or ["lora"])[0]}
    for key in _REQUIRED:
        if raw.get(key) in (None, ""):
            raise DeltatuneError(f"{key}: missing [{source}]")
    top = {k: check_type(k, raw.get(k), hint) for k, hint in _TOP_LEVEL.items()}
    if top["task"] not in TASKS:
        near = difflib.get_close_matches(top["task"], TASKS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise DeltatuneError(f"task: must be one of {' | '.join(TASKS)}, got {top['task']!r}{hint}")
    data = _build_section(DataConfig, raw.get("data"), "data", sources, source)
    train = _build_section(TrainConfig, raw.get("train"), "train", sources, source)
    method = raw.get("method")
    if not isinstance(method, dict):
        raise DeltatuneError(f"method: expected a mapping with at least `name:`, got {method!r}")
    config = RunConfig(model=top["model"], task=top["task"], data=data, method=dict(method),
                       train=train, output_dir=top["output_dir"], num_labels=top["num_labels"],
                       compare=dict(compare), quantize=raw.get("quantize") or "none")
    _check_consistency(config)
    return config


def _check_consistency(config: RunConfig) -> None:
    data = config.data
    if data.format not in FORMATS_BY_TASK[config.task]:
        raise DeltatuneError(
            f"data.format: {data.format!r} does not fit task {config.task!r} (use one of "
            f"{' | '.join(FORMATS_BY_TASK[config.task])})")
    if data.train is None and data.eval is None:
        raise DeltatuneError("data.train: missing (give data.train and/or data.eval)")
    metric = config.train.metric
    if metric is not None and metric not in METRICS_BY_TASK[config.task]:
        raise DeltatuneError(f"train.metric: {metric!r} is not computed for task {config.task!r} "
                             f"(use one of {' | '.join(METRICS_BY_TASK[config.task])})")
    if data.packing and config.task != "causal-lm":
        raise DeltatuneError("data.packing: only causal-lm data can be packed")
    if config.num_labels is not None:
        if config.task != "classification":
            raise DeltatuneError("num_labels: only for task classification")
        if config.num_labels < 2:
            raise DeltatuneError(f"num_labels: must be >= 2, got {config.num_labels}")
        if data.label_names is not None and len(data.label_names) != config.num_labels:
            raise DeltatuneError(f"num_labels: {config.num_labels} disagrees with data.label_names "
                                 f"({len(data.label_names)} names)")
    elif data.label_names is not None and config.task == "classification":
        config.num_labels = len(data.label_names)


def resolve_data_path(value: str | None, base_dir: Path) -> str | None:
    """Where a data path points: hf: names are kept; `$DELTATUNE_DATA/...` and `../shared/data/...`
    use $DELTATUNE_DATA when set; other relative paths are taken from the config file's directory,
    or from the working directory when only there the file exists (configs in examples/ name
    ../shared/data relative to the repository root, as a user running from the root expects)."""
    if value is None or value.startswith(HUB_PREFIX):
        return value
    env = os.environ.get(DATA_ENV)
    for prefix in ("$" + DATA_ENV, "${" + DATA_ENV + "}", SHARED_DATA_PREFIX):
        if value == prefix or value.startswith(prefix + "/"):
            if env:
                return str(Path(env) / value[len(prefix):].lstrip("/"))
            if prefix != SHARED_DATA_PREFIX:
                raise DeltatuneError(f"{value}: ${DATA_ENV} is not set")
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    beside_config = base_dir / path
    if not beside_config.exists() and path.exists():
        return str(path.resolve())
    if not beside_config.exists():  # examples/x.yaml names ../shared/data from the repo root
        for ancestor in base_dir.parents:
            if (ancestor / path).exists():
                return str((ancestor / path).resolve())
    return str(beside_config.resolve())


def load_run_config(path: str | os.PathLike, overrides: typing.Iterable[str] = (),
                    comparison: bool = False) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, validate, resolve data paths.
    (`comparison`: for compare/plan, `method:` is optional; see build_run_config.)"""
    path = Path(path)
    raw = read_yaml(path)
    sources: dict[str, str] = {}
    full_keys: dict[str, str] = {}
    apply_overrides(raw, list(overrides), sources, full_keys)
    config = build_run_config(raw, str(path), sources, full_keys, comparison=comparison)
    base_dir = path.resolve().parent
    config.data.train = resolve_data_path(config.data.train, base_dir)
    config.data.eval = resolve_data_path(config.data.eval, base_dir)
    return config


def save_run_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
