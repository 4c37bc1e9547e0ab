"""No module imports from a layer above its own (docs/architecture.md draws the layers).

Every import is read from the source with `ast` — module-level and inside functions alike, since
a deferred import is still a dependency — so a violation is reported without importing anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deltatune"

# Lowest first. A module may import from its own layer and the layers below it, never above.
# The key is the first name under `deltatune.` (a top-level module or a subpackage).
LAYERS: list[tuple[str, set[str]]] = [
    ("core", {"errors", "config", "hardware"}),                  # settings, machine facts
    ("base", {"models", "quantization", "data"}),                # a frozen base and its data
    ("deltas", {"methods", "deltas", "mixed", "combine", "export", "adapters_io"}),
    ("training", {"training", "tracking"}),                      # tracking: where a run's numbers go
    ("applications", {"compare", "serving", "ui"}),
    ("entry points", {"cli", "__init__"}),                       # `deltatune ...`, the public API
]
LAYER_OF = {part: index for index, (_, parts) in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """`deltatune.training.loop` -> "training"; the package itself -> "__init__"."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every deltatune module `path` imports, relative imports resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == "deltatune" or name.startswith("deltatune.")]


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        own = LAYER_OF.get(part_of(module))
        if own is None:
            problems.append(f"{module}: in no layer (add {part_of(module)!r} to LAYERS)")
            continue
        for line, target in imported_modules(path):
            # `import deltatune.x` / `from deltatune import x` name the package: judge by x
            other = LAYER_OF.get(part_of(target))
            if other is not None and other > own:
                problems.append(f"{module} (layer {LAYERS[own][0]}) imports {target} "
                                f"(layer {LAYERS[other][0]}) at {path.relative_to(PACKAGE.parent)}:{line}")
    return problems


def test_every_module_belongs_to_a_layer_and_imports_only_downward():
    problems = upward_imports()
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_check_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "deltatune"
    (package / "config").mkdir(parents=True)
    (package / "config" / "run.py").write_text(
        "def later():\n    from deltatune.training.loop import train\n"
        "from ..methods import get_method\n", encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    problems = upward_imports()
    assert len(problems) == 2, problems
    assert any("deltatune.config.run (layer core) imports deltatune.training.loop (layer training)" in p
               for p in problems)
    assert any("imports deltatune.methods (layer deltas) at deltatune/config/run.py:3" in p for p in problems)

