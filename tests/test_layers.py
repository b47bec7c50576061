"""The package's layering holds: each layer imports only the layers below it.

The rules are the picture in docs/ARCHITECTURE.md; this test reads every module's imports
(statically, with ast) and fails naming the module and the import that breaks a rule.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# layer -> the layers of ours it may import (besides itself). Third-party imports are free.
ALLOWED = {
    "ucofia_jax.ops": set(),
    "ucofia_jax.kernels": {"ucofia_jax.ops"},
    "ucofia_jax.models": {"ucofia_jax.ops"},
    "ucofia_jax.runtime": set(),
    "ucofia_jax.training": {"ucofia_jax.models", "ucofia_jax.ops", "ucofia_jax.runtime"},
    "ucofia_jax.evaluation": {
        "ucofia_jax.models",
        "ucofia_jax.ops",
        "ucofia_jax.kernels",
        "ucofia_jax.runtime",
    },
    # Configs are data: the schema imports none of our code but its error class.
    "ucofia_jax.config": {"ucofia_jax.runtime.errors"},
    "ucofia_jax.tools": {"ucofia_jax.models", "ucofia_jax.ops", "ucofia_jax.kernels"},
    # The data layer only needs the tokenizer of the model's text tower.
    "data_pipeline": {"ucofia_jax.models.tokenizer"},
    # Search your videos: a tool beside evaluation (its scorer, the decoder, checkpoints).
    "ucofia_jax.search": {
        "ucofia_jax.models",
        "ucofia_jax.ops",
        "ucofia_jax.evaluation",
        "ucofia_jax.runtime",
        "ucofia_jax.training",
        "data_pipeline",
    },
}
# Every layer may read the config's defaults and rules (ucofia_jax.config imports no layer).
for _layer_imports in ALLOWED.values():
    _layer_imports.add("ucofia_jax.config")
# The program at the top, and its checks before a run, may import everything.
TOP = {"ucofia_jax.main", "ucofia_jax.preflight"}
OURS = ("ucofia_jax", "data_pipeline", "configs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                yield node.lineno, f"{node.module}.{a.name}"


def _layer(name: str):
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def _modules():
    for root in ("ucofia_jax", "data_pipeline"):
        yield from sorted((REPO / root).rglob("*.py"))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_module_imports_only_layers_below(path):
    name = _module_name(path)
    if name in TOP or name == "ucofia_jax":
        return
    own = _layer(name)
    assert own is not None, f"{name} belongs to no layer: add it to ALLOWED and the docs"
    bad = []
    for line, target in _imports(path):
        if not target.startswith(OURS):
            continue
        other = _layer(target)
        allowed = ALLOWED[own] | {own}
        if other == own:
            continue
        if not any(target == a or target.startswith(a + ".") for a in allowed):
            bad.append(f"{path.relative_to(REPO)}:{line} imports {target} ({own} -> {other})")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_every_layer_has_modules():
    # A renamed package must not silently empty a rule.
    layers = {_layer(_module_name(p)) for p in _modules()}
    assert set(ALLOWED) <= layers
