"""The package's layers: no module imports from a layer above its own.

Every module under ``src/relapse`` is parsed (not imported) and each of its ``relapse.*`` imports, at the
top or inside a function, is checked against the order below. A lazy import inside a function still
makes the lower module depend on the higher one, so it counts too. Modules of one layer may import each
other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import relapse

SOURCE = Path(relapse.__file__).resolve().parent

#: Low to high. A module belongs to the layer of the longest prefix that names it.
#: - ``workers`` (a process pool over errors and runtime) serves the audit and the experiment, so it sits
#:   with the plumbing at the bottom.
#: - The measurements of ``metrics`` (QA recall, scoring, the evaluator) stand on data alone, and
#:   fine-tuning stops on QA recall, so they sit below ``training``; ``metrics.run`` (``relapse eval``,
#:   which applies an attack before measuring) sits with the attacks.
LAYERS: list[tuple[str, ...]] = [
    ("relapse", "relapse.errors", "relapse.options", "relapse.runtime", "relapse.workers"),
    ("relapse.data",),
    ("relapse.models",),
    ("relapse.metrics",),
    ("relapse.training",),
    ("relapse.methods", "relapse.attacks", "relapse.metrics.run"),
    ("relapse.audit",),
    ("relapse.report",),
    ("relapse.experiment", "relapse.demo"),
    ("relapse.cli", "relapse.__main__"),
]


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the longest prefix naming ``module``."""
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS")
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def relapse_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every ``relapse.*`` import of a file; ``from relapse import x`` gives
    ``relapse.x`` when ``x`` is a submodule, else ``relapse``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "relapse"
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "relapse":
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (SOURCE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    SOURCE.parent / Path(*candidate.split("."))
                ).is_dir()
                found.append((node.lineno, candidate if is_module else node.module))
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(SOURCE.rglob("*.py")):
        name = module_name(path)
        own = layer_of(name)
        for line, imported in sorted(set(relapse_imports(path))):
            if layer_of(imported) > own:
                problems.append(f"{path.relative_to(SOURCE.parent)}:{line}: {name} imports {imported}")
    return problems


def test_every_module_has_a_layer():
    for path in SOURCE.rglob("*.py"):
        layer_of(module_name(path))


def test_no_module_imports_from_a_layer_above_its_own():
    problems = upward_imports()
    assert not problems, "imports that point upward:\n" + "\n".join(problems)


def test_the_layer_order_is_checked():
    """The checker itself: a module importing from above is caught, one importing from below is not."""
    assert layer_of("relapse.models.io") < layer_of("relapse.training.loop") < layer_of("relapse.methods.npo")
    assert layer_of("relapse.metrics.qa") < layer_of("relapse.training.finetune")
    assert layer_of("relapse.metrics.run") == layer_of("relapse.attacks.base")
    assert layer_of("relapse.cli") == len(LAYERS) - 1
