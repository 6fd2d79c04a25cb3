"""The package's layering, read from its source: what may import what, and formats spelled once."""

from __future__ import annotations

import ast
from pathlib import Path

import guardtune

PACKAGE = Path(guardtune.__file__).parent
RECIPE = "guardtune.training.finetune"
# Names of files and keys that a writer and a reader share: only guardtune.contract spells them.
CONTRACT_LITERALS = (
    "guardtune-policy.json",
    "guardtune-provenance.json",
    "guardtune_provenance",
    "pytorch_lora_weights.safetensors",
    "model.diffusion_model.",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _type_only(tree: ast.Module) -> set[int]:
    """Nodes under `if TYPE_CHECKING:`: imports for annotations, never executed."""
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """guardtune modules a module imports when it runs, at the top or inside functions."""
    found = set()
    skipped = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from guardtune.x import y` may name a module y or an attribute of x.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {name for name in names if name in known and name != "guardtune"}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(tree, set(modules)) - {name} for name, tree in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting, name])
        visiting.append(name)
        for imported in sorted(graph[name]):
            # A package's __init__ importing nothing, its modules are leaves of their own.
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_only_the_cli_and_the_demo_import_the_fine_tune_recipe():
    importers = {name for name, imported in _graph().items() if RECIPE in imported}
    assert importers == {"guardtune.cli", "guardtune.digits.demo"}


def test_product_code_does_not_depend_on_the_digits_domain():
    product = ("guardtune.trust", "guardtune.enforce", "guardtune.training", "guardtune.learn")
    product += ("guardtune.models", "guardtune.data", "guardtune.generate", "guardtune.contract")
    for name, imported in _graph().items():
        if name.startswith(product):
            assert not any(i.startswith("guardtune.digits") for i in imported), name


def test_learner_and_evaluate_use_components_not_recipes():
    for name, imported in _graph().items():
        if name.startswith(("guardtune.learn", "guardtune.evaluate", "guardtune.training.")):
            assert RECIPE not in imported or name == RECIPE, name
            assert "guardtune.publish" not in imported, name


def _string_constants(tree: ast.Module) -> set[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings
    }  # fmt: skip


def test_each_on_disk_name_is_spelled_once_in_the_contract():
    for name, tree in _modules().items():
        if name == "guardtune.contract":
            continue
        constants = _string_constants(tree)
        spelled = [
            literal
            for literal in CONTRACT_LITERALS
            if any(literal in text and "--" not in text and " " not in text for text in constants)
        ]
        assert not spelled, f"{name} spells {spelled[0]!r}; import it from guardtune.contract"
