"""MkDocs hook: the reference pages generated from the code, so that they cannot drift from it.

    reference/config.md  every run-config section and key: type, default and the comment beside
                         the field in its dataclass (deltatune.config), and every method's options
    reference/cli.md     every `deltatune` subcommand and option, from the real argparse parser

Both are generated on every build. Their files in the repository are a short note saying so (so
that links to them resolve where the repository itself is read); on_page_markdown puts the
generated reference in place of that note. A page named in mkdocs.yml's nav that no one has
written yet is given a one-line placeholder, logged at INFO.
A line `--8<-- "benchmarks/RESULTS.md"` in a page includes that repository file at build time
(include_file: headings moved one level down, links to files outside docs/ shown as their path).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import html
import inspect
import io
import logging
import os
import re
import textwrap
import tokenize
import typing
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.reference")

# RunConfig fields that are sections of their own: their keys are in the tables these link to
SECTION_LINKS = {"data": "[data:](#data)", "train": "[train:](#train)", "method": "[method:](#method)",
                 "compare": "[compare:](#compare)"}


# ------------------------------------------------------------------------------ rendering helpers
def _code(text: str) -> str:
    """Inline code that is safe inside a Markdown table cell."""
    return "<code>" + html.escape(text).replace("|", "&#124;") + "</code>" if text else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _yaml_value(value: typing.Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


# ------------------------------------------------------------------------------ dataclass fields
@dataclasses.dataclass
class FieldDoc:
    name: str
    type: str
    default: str        # rendered as YAML; "" when the key is required
    description: str


def _comments_by_line(source: str) -> dict[int, str]:
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def _class_field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """name -> (annotation source, comment) for the fields this class itself declares: the
    trailing comment on the field's line(s) after the block of comment lines just above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = _comments_by_line(source)
    class_node = ast.parse(source).body[0]
    out = {}
    for node in class_node.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        annotation = ast.get_source_segment(source, node.annotation) or ""
        if "ClassVar" in annotation:
            continue
        above = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        out[node.target.id] = (annotation, " ".join(above + beside))
    return out


def field_docs(cls: type) -> list[FieldDoc]:
    """Every dataclass field of `cls` (inherited ones included), in declaration order."""
    declared: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not object:
            declared.update(_class_field_docs(klass))
    docs = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = _yaml_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = _yaml_value(f.default_factory())  # type: ignore[misc]
        else:
            default = ""
        annotation, comment = declared.get(f.name, (str(f.type), ""))
        docs.append(FieldDoc(f.name, annotation, default, comment))
    return docs


def _field_table(fields: list[FieldDoc], prefix: str, skip: tuple[str, ...] = ()) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in fields:
        if f.name in skip:
            continue
        if not prefix and f.name in SECTION_LINKS:  # a section: its keys are in a table of their own
            default = ("*required*, " if not f.default else "") + "see " + SECTION_LINKS[f.name]
        else:
            default = _code(f.default) if f.default else "*required*"
        rows.append(f"| {_code(prefix + f.name)} | {_code(f.type)} | {default} | {_cell(f.description)} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ config reference
def _config_classes():
    """The run-config dataclasses, wherever the refactor keeps them (deltatune.config first)."""
    import importlib

    for module_name in ("deltatune.config", "deltatune.config.run"):
        module = importlib.import_module(module_name)
        if all(hasattr(module, n) for n in ("RunConfig", "DataConfig", "TrainConfig")):
            return module.RunConfig, module.DataConfig, module.TrainConfig
    raise ImportError("RunConfig, DataConfig and TrainConfig not found in deltatune.config")


def config_reference() -> str:
    import deltatune
    from deltatune.methods import REGISTRY

    run_cls, data_cls, train_cls = _config_classes()
    sections = {"data": data_cls, "train": train_cls}
    top = field_docs(run_cls)
    parts = [
        "# Run configuration reference",
        "",
        "Generated from the configuration dataclasses at every docs build: each key's type, default "
        "and description are the ones in the code. Every key can also be set on the command line as "
        "`key=value` (`deltatune train CONFIG.yaml train.lr=3e-4 method.r=16`). An unknown key or a "
        "value of the wrong type is one error line naming the key.",
        "",
        "## Top level",
        "",
        _field_table(top, ""),
    ]
    for name, cls in sections.items():
        parts += ["", f"## `{name}:`", ""]
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(cls.__name__ + "("):
            parts += [doc, ""]
        parts.append(_field_table(field_docs(cls), f"{name}."))

    quantization = getattr(deltatune, "QuantizationConfig", None)
    if quantization is not None:
        parts += ["", "## `quantize:`", "",
                  "`none` (a dense base), a type name (`quantize: nf4`), or a mapping with these keys "
                  "(PEFT methods only: full fine-tuning cannot train integer codes).", "",
                  _field_table(field_docs(quantization), "quantize.")]

    parts += ["", "## `method:`", "",
              "`method.name` picks the method (or a variant, a named preset of a method's options); the "
              "other keys are that method's options. `train.lr` defaults to the method's own learning "
              "rate when not set.", ""]
    for name, method in REGISTRY.items():
        cls = method.config
        parts += [f"### `{name}`", ""]
        facts = [f"config class `{cls.__name__}`", f"PEFT type `{cls.peft_type}`" if cls.peft_type else "",
                 f"default lr `{method.default_lr:g}`",
                 "mergeable" if method.merge is not None else "not mergeable"]
        parts.append(", ".join(f for f in facts if f) + ".")
        for variant, options in method.variants.items():
            parts.append(f"Variant `{variant}`: {name} with `{_yaml_value(options)}`.")
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(cls.__name__ + "("):
            parts += ["", doc.split("\n\n")[0]]
        parts += ["", _field_table(field_docs(cls), "method."), ""]

    compare_keys = _compare_keys()
    if compare_keys:
        parts += ["## `compare:`", "",
                  "Read by `deltatune compare` and `deltatune plan` only; a comparison config needs no "
                  "`method:` section. Keys: " + ", ".join(f"`compare.{k}`" for k in compare_keys)
                  + ". See [Comparing methods](../guides/compare.md).", ""]
    return "\n".join(parts) + "\n"


def _compare_keys() -> list[str]:
    try:
        from deltatune.compare.settings import SETTINGS
    except ImportError:
        return []
    return sorted(SETTINGS)


# ------------------------------------------------------------------------------ CLI reference
def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | description |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += " " + (action.metavar or action.dest.upper())
        else:
            name = action.metavar or action.dest
            name = f"{name} ..." if action.nargs in ("*", "+") else name
            name = f"[{name}]" if action.nargs in ("?", "*") else name
        description = action.help or ""
        if action.choices:
            description = (description + " " if description else "") + "One of: " + ", ".join(
                f"`{c}`" for c in action.choices) + "."
        if action.option_strings and action.required:
            description = "**Required.** " + description
        if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):
            default = ""
        else:
            default = _code(str(action.default))
        rows.append(f"| {_code(name)} | {default} | {_cell(description)} |")
    return rows


def cli_reference() -> str:
    from deltatune.cli import build_parser

    parser = build_parser()
    parts = ["# Command-line reference", "",
             "Generated from `deltatune.cli.build_parser()` at every docs build. Every error is one "
             "line on stderr and exit code 2. Run configs take `key=value` overrides after the "
             "config file (see the [run configuration reference](config.md)).", ""]
    for name, help_text, sub in _subcommands(parser):
        usage = " ".join(sub.format_usage().replace("usage: ", "", 1).split())
        parts += [f"## `deltatune {name}`", "", help_text[:1].upper() + help_text[1:] + ".", "",
                  "```text", usage, "```", "", *_argument_rows(sub), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ MkDocs events
def _nav_pages(nav) -> list[tuple[str, str]]:
    """(title, path) of every page in the nav config."""
    out = []
    for item in nav or []:
        if isinstance(item, str):
            out.append((Path(item).stem, item))
        elif isinstance(item, dict):
            for title, value in item.items():
                if isinstance(value, str):
                    out.append((title, value))
                else:
                    out += _nav_pages(value)
    return out


# docs path -> its generated Markdown, which replaces the page's source note in on_page_markdown
GENERATED = {"reference/config.md": config_reference, "reference/cli.md": cli_reference}


def on_files(files, config):
    from mkdocs.structure.files import File

    missing = [(title, path) for title, path in _nav_pages(config["nav"])
               if path.endswith(".md") and files.get_file_from_path(path) is None]
    for title, path in missing:
        files.append(File.generated(config, path, content=f"# {title}\n\nThis page is being written.\n"))
    if missing:
        log.info("placeholder pages (named in nav, not yet written): %s", ", ".join(p for _, p in missing))
    return files


# ------------------------------------------------------------------------------ included files
REPO = Path(__file__).resolve().parents[2]
INCLUDE = re.compile(r'^--8<--\s+"(?P<path>[^"]+)"\s*$', re.MULTILINE)
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def include_file(path: str, page_uri: str, docs_dir: Path) -> str:
    """A repository file's Markdown for a docs page: headings one level down (the page keeps its
    own title), and relative links that point outside docs/ (scripts, JSON results) turned into
    the path as code, since the site does not carry those files."""
    source = REPO / path
    text = source.read_text(encoding="utf-8")
    text = re.sub(r"^(#{1,5}) ", r"#\1 ", text, flags=re.MULTILINE)

    def relink(match: re.Match) -> str:
        target = match["target"]
        if re.match(r"^[a-z]+:", target) or target.startswith("/"):
            return match[0]
        resolved = (source.parent / target).resolve()
        try:
            inside_docs = resolved.relative_to(docs_dir.resolve())
        except ValueError:
            return f"{match['text']} (`{resolved.relative_to(REPO)}`)"
        page_dir = (docs_dir / page_uri).parent
        return f"{match['bang']}[{match['text']}]({os.path.relpath(docs_dir / inside_docs, page_dir)}{match['anchor'] or ''})"

    return LINK.sub(relink, text)


def on_page_markdown(markdown, page, config, files):
    generate = GENERATED.get(page.file.src_uri)
    if generate is not None:
        return generate()
    docs_dir = Path(config["docs_dir"])
    return INCLUDE.sub(lambda m: include_file(m["path"], page.file.src_uri, docs_dir), markdown)
