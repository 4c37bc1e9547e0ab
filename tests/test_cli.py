"""The CLI: `inspect`, and that bad input is one line on stderr with exit code 2."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import randomize_trainable, tiny_llama

import deltatune as dt
from deltatune.cli import main


@pytest.fixture
def lora_dir(tmp_path):
    model = dt.apply(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_trainable(model)
    return dt.save_adapter(model, tmp_path / "adapter")


def test_help_first_says_what_deltatune_is(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # after the usage lines
    assert description.startswith("deltatune fine-tunes pretrained transformers by many methods")


def test_every_argument_has_help():
    """`--help` and the generated CLI reference (docs/reference/cli.md) show each argument's help;
    one without it is a blank row there."""
    import argparse

    from deltatune.cli import build_parser

    missing = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for arg in sub._actions:
                    if not isinstance(arg, argparse._HelpAction) and not (arg.help or "").strip():
                        missing.append(f"deltatune {name} {'/'.join(arg.option_strings) or arg.dest}")
    assert not missing, "arguments without help=: " + ", ".join(missing)


def test_model_help_names_every_preset():
    from deltatune.cli import MODEL_HELP
    from deltatune.models import PRESETS

    assert all(name in MODEL_HELP for name in PRESETS), MODEL_HELP


def test_help_shows_value_defaults_only(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "most tokens generated after the prompt (default: 128)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_inspect_reports_method_rank_targets_and_size(lora_dir, capsys):
    assert main(["inspect", str(lora_dir)]) == 0
    out = capsys.readouterr().out
    assert "method:      lora (LORA)" in out
    assert "r: 4" in out and "['q_proj', 'v_proj']" in out
    assert "parameters:  1,792 in 8 tensors" in out  # 2 layers x (4*(64+64) + 4*(64+32))


def test_inspect_real_preset_adapter_compares_with_base(tmp_path, capsys):
    model, _ = dt.load_model("minilm", task="classification", num_labels=2)
    dt.apply(model, dt.LoraConfig(r=8, target_modules=["query", "value"]))
    dt.save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    import json
    info = json.loads(capsys.readouterr().out)
    assert info["base_model"] == "minilm" and info["method"] == "lora"
    assert info["options"]["target_modules"] == ["query", "value"]
    # 6 layers x 2 targets x 8 x (384 + 384) + the classifier head (384*2 + 2)
    assert info["parameters"] == 6 * 2 * 8 * 768 + 770
    assert 0 < info["size_bytes"] < 0.02 * info["base_size_bytes"]


@pytest.mark.parametrize("argv,message", [
    (["inspect", "/no/such/dir"], "/no/such/dir: adapter directory not found"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["merge", "--model", "x"], "the following arguments are required: --adapter, --out"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_console_script_exit_code_without_traceback(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "DORA_PLUS"}')
    result = subprocess.run([sys.executable, "-m", "deltatune.cli", "inspect", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown peft_type 'DORA_PLUS'" in result.stderr
