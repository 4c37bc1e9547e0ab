"""`deltatune ...`: parse arguments and call the library. No logic of its own.

Every DeltatuneError (bad config, data, model or adapter) becomes one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from deltatune.errors import DeltatuneError


DESCRIPTION = ("deltatune fine-tunes pretrained transformers by many methods (full, LoRA/DoRA, "
               "adapters, prompt, p-tuning, prefix, IA3) from one YAML run config, and measures each: "
               "train, evaluate, compare, plan memory, merge, generate, serve.")


# Written out rather than read from deltatune.models.PRESETS: `--help` must not wait for torch to import.
MODEL_HELP = "a preset (minilm, smollm2-135m), a local transformers directory, a .gguf file or a Hub name"


class _HelpFormatter(argparse.HelpFormatter):
    """`--help` shows an option's default where it is a value (a number, a name); None, False and
    [] mean "not given", and those options say in their help what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS
                or action.default == [] or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise DeltatuneError(f"{self.prog}: {message}")


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> None:
    from deltatune.adapters_io import inspect_adapter

    if args.hardware:
        from deltatune.hardware import format_report, hardware_report

        report = hardware_report(refresh=args.refresh)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return
    if not args.directory:
        raise DeltatuneError("inspect: give an adapter or model directory, or --hardware")
    info = inspect_adapter(args.directory)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"method:      {info['method']} ({info['peft_type'] or 'transformers directory'})")
    print(f"base model:  {info['base_model']}")
    if info.get("base_quantization"):  # trained on a quantized base; rebuilt so by merge/eval/serve
        q = info["base_quantization"]
        print(f"base quantized: {q['type']} (double quant {q['double_quant']}, compute {q['compute_dtype']})")
    print(f"task:        {info['task_type']}")
    for key, value in info["options"].items():
        if key != "method":
            print(f"  {key}: {value}")
    print(f"parameters:  {info['parameters']:,} in {info['tensors']} tensors")
    size, base = info["size_bytes"], info["base_size_bytes"]
    ratio = f" ({100 * size / base:.2f}% of the base model's {_human(base)})" if base else ""
    print(f"size:        {_human(size)}{ratio}")


def cmd_train(args: argparse.Namespace) -> None:
    from deltatune.training.loop import train_from_config

    train_from_config(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)


def cmd_eval(args: argparse.Namespace) -> None:
    from deltatune.training.evaluation import evaluate_from_cli

    print(json.dumps(evaluate_from_cli(args), indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    from deltatune.serving.generate import generate_from_cli

    print(generate_from_cli(args))


def cmd_compare(args: argparse.Namespace) -> None:
    from deltatune.compare.runner import compare_from_config

    compare_from_config(args.config, args.overrides, methods=args.methods, overwrite=args.overwrite,
                        join=args.join)


def cmd_plan(args: argparse.Namespace) -> None:
    from deltatune.compare.max_length import max_length_from_config
    from deltatune.compare.plan import plan_from_config

    if args.max_length is not None:
        if args.max_length != "auto":
            raise DeltatuneError(f"--max-length: only auto is planned, got {args.max_length!r}")
        max_length_from_config(args.config, args.overrides, args.methods, args.memory or "auto",
                               args.json)
        return
    if args.memory is not None:
        raise DeltatuneError("--memory: goes with --max-length auto (the longest length within it)")
    plan_from_config(args.config, args.overrides, methods=args.methods,
                     world_size=args.world_size, distributed=args.distributed, as_json=args.json)


def cmd_merge(args: argparse.Namespace) -> None:
    from deltatune.export import merge_from_cli

    merge_from_cli(args.model, args.adapter, args.out, overwrite=args.overwrite)


def cmd_serve(args: argparse.Namespace) -> None:
    from deltatune.serving.server import serve_from_cli

    serve_from_cli(args)


def cmd_ui(args: argparse.Namespace) -> None:
    from deltatune.ui.app import ui_from_cli

    ui_from_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deltatune", description=DESCRIPTION,
                     epilog="`deltatune COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one method from a YAML run config")
    p.add_argument("config", help="the YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.r=16")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model (with or without an adapter)")
    p.add_argument("config", nargs="?",
                   help="a YAML run config: its model is evaluated on its data.eval "
                        "(without one, give --model and --data)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. data.eval=dev.jsonl")
    p.add_argument("--model", help=f"the base model: {MODEL_HELP}; with a config, used instead of its model")
    p.add_argument("--adapter",
                   help="an adapter directory, or a full fine-tuned model directory, to evaluate "
                        "(default: with a config, its output_dir when a result is saved there; "
                        "else none, the base model alone)")
    p.add_argument("--data", help="without a config: the eval data file (with a config, data.eval is used)")
    p.add_argument("--task", default=None, choices=["classification", "causal-lm"],
                   help="without a config: the model's task (default: the one --format fits, else "
                        "read from the adapter or model)")
    p.add_argument("--format", default=None,
                   help="without a config: the data file's format, a data.format value that fits the "
                        "task (default: classification for classification, text for causal-lm)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", help="the text to continue; a chat model gets it as one user turn of its chat template")
    p.add_argument("--model", required=True,
                   help=f"the base model: {MODEL_HELP} (a full fine-tuned --adapter directory is used instead)")
    p.add_argument("--adapter", help="an adapter directory to add to the base, or a full fine-tuned model directory")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated after the prompt")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy; above 0, top-p sampling at this temperature")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="when sampling: draw from the smallest set of tokens whose probabilities sum "
                        "to at least P, in (0, 1]")
    p.add_argument("--no-chat-template", action="store_true",
                   help="tokenize the prompt as it is, without the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0, help="the random seed for sampling, when --temperature is above 0")
    p.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"], default=None,
                   help="quantize the base (default: as the adapter was trained)")
    p.set_defaults(func=cmd_generate)

    for name, func, help_text in (("compare", cmd_compare, "train and compare several methods"),
                                  ("plan", cmd_plan, "predict memory and storage per method")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="a YAML run config with a compare: section (method: optional)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200")
        p.add_argument("--methods", default=None,
                       help="comma-separated, e.g. full,lora,prefix (default: compare.methods)")
        if name == "compare":
            p.add_argument("--overwrite", action="store_true",
                           help="write into an output_dir that holds other files, and rerun finished "
                                "runs made with other settings (matching finished runs are still reused)")
            p.add_argument("--join", action="store_true",
                           help="work beside a running comparison with the same config: take search "
                                "trials and final runs from its study (compare.search.storage)")
        else:
            p.add_argument("--world-size", type=int, default=1,
                           help="per-process memory when torchrun starts N processes")
            p.add_argument("--distributed", choices=("ddp", "fsdp"), default="ddp",
                           help="with --world-size above 1: ddp, each process holding the whole model, "
                                "or fsdp, weights, gradients and optimizer state sharded across processes")
            p.add_argument("--max-length", default=None, metavar="auto",
                           help="auto: the longest sequence (one row, batch 1) that trains one step "
                                "of each method within --memory")
            p.add_argument("--memory", default=None,
                           help="with --max-length auto: the budget, e.g. 20GB (GB = 2^30 bytes), "
                                "or auto: what the machine has available now (default)")
            p.add_argument("--json", action="store_true", help="one JSON object per method on stdout")
        p.set_defaults(func=func)

    p = sub.add_parser("merge", help="fold an adapter into the base and export a plain model")
    p.add_argument("--model", required=True, help=f"the base model the adapter was trained on: {MODEL_HELP}")
    p.add_argument("--adapter", required=True, help="the adapter directory, of a mergeable method")
    p.add_argument("--out", required=True, help="the directory to write the merged model and tokenizer to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="describe a saved adapter or model directory, or --hardware")
    p.add_argument("directory", nargs="?", help="a saved adapter directory, or a full fine-tuned model directory")
    p.add_argument("--json", action="store_true", help="print the description (or the --hardware report) as JSON")
    p.add_argument("--hardware", action="store_true",
                   help="this machine's CPU flags, measured fp32/bf16 matmul peaks, and what bf16: auto picks")
    p.add_argument("--refresh", action="store_true", help="with --hardware: measure again, ignoring the cache")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, one adapter per request")
    p.add_argument("--model", required=True,
                   help=f"the base model, served under this name too: {MODEL_HELP}")
    p.add_argument("--adapter", action="append", default=[], help="name=DIR (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.add_argument("--max-batch", type=int, default=32, help="most rows decoded together")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="static engine: how long a request waits for others to share its batch")
    p.add_argument("--engine", default="continuous", choices=["continuous", "static"],
                   help="continuous: rows join/leave every step; static: one generate() per batch")
    p.add_argument("--adapter-dir", help="serve every adapter found here by name, loaded on demand")
    p.add_argument("--max-adapters", type=int, help="most adapters resident at once (LRU)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or $DELTATUNE_API_KEY)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default: the model's context)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens x n (default: the context)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--quantize", choices=["none", "nf4", "fp4", "int8"], default=None,
                   help="quantize the base (default: as the adapters were trained)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="the base's weights and compute: auto = bf16 where this machine measures "
                        "bf16 faster (deltatune inspect --hardware), else fp32")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="local web app: runs, launch, compare, playground")
    p.add_argument("--runs", default="runs", help="the runs folder to show and launch into")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on; beyond loopback it needs --api-key (or $DELTATUNE_API_KEY)")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on")
    p.add_argument("--api-key", default=None, help="required when --host is not a loopback address")
    p.set_defaults(func=cmd_ui)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may also follow a flag (`train c.yaml --resume
    train.max_steps=9`), which argparse alone rejects as "unrecognized arguments"."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("TORCHELASTIC_RUN_ID"):
        # A torchrun worker leaves without interpreter teardown: gloo's worker threads can
        # abort a process that finalizes after its process group is gone (SIGABRT, "terminate
        # called without an active exception"), turning a finished run into a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parse_args(argv)
        args.func(args)
    except DeltatuneError as exc:
        print(f"deltatune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a denied permission: the file and the reason, one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"deltatune: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
