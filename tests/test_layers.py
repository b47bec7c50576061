"""The package's layering holds: each layer imports only the layers below it.

The rules are the picture in docs/ARCHITECTURE.md; this test reads every module's imports
(statically, with ast) and fails naming the module and the import that breaks a rule.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ERRORS = "ucofia_jax.errors"
# What a tool may use of the model: the one door (Model) and its typed features. Weights come
# through the weights door (ucofia_jax/weights.py), never from the readers themselves.
MODEL_DOOR = {"ucofia_jax.models.model", "ucofia_jax.models.features"}

# layer -> the layers (or single modules) of ours it may import (besides itself).
# Third-party imports are free. The user-facing errors are the bottom layer: every layer may
# raise them.
ALLOWED = {
    ERRORS: set(),
    "ucofia_jax.ops": {ERRORS},
    "ucofia_jax.kernels": {"ucofia_jax.ops", "ucofia_jax.runtime.caches", ERRORS},
    "ucofia_jax.models": {"ucofia_jax.ops", ERRORS},
    "ucofia_jax.runtime": {ERRORS},
    "ucofia_jax.training": MODEL_DOOR | {"ucofia_jax.ops", "ucofia_jax.runtime", ERRORS},
    "ucofia_jax.evaluation": MODEL_DOOR
    | {"ucofia_jax.ops", "ucofia_jax.kernels", "ucofia_jax.runtime", ERRORS},
    # The weights door: a model and its params from a run's checkpoint, the released UCoFiA
    # weights, CLIP alone or random init.
    "ucofia_jax.weights": {
        "ucofia_jax.models",
        "ucofia_jax.ops",
        "ucofia_jax.runtime",
        "ucofia_jax.training.checkpoints",
        ERRORS,
    },
    # Configs are data: the schema imports none of our code but its error class.
    "ucofia_jax.config": {ERRORS},
    "ucofia_jax.tools": MODEL_DOOR | {"ucofia_jax.ops", "ucofia_jax.kernels", ERRORS},
    # The data layer needs the tokenizer of the model's text tower, and the rows of each
    # global batch that the mesh puts on this process's devices.
    "data_pipeline": {
        "ucofia_jax.models.tokenizer",
        "ucofia_jax.runtime.distributed",
        "ucofia_jax.runtime.sharding",
        ERRORS,
    },
    # Search your videos: a tool beside evaluation (its scorer, the decoder); weights through
    # the weights door, not training's checkpoints. The tokenizer, as data_pipeline uses it:
    # an index's compiled query model (search/query_model.py) tokenizes without Flax.
    "ucofia_jax.search": MODEL_DOOR
    | {
        "ucofia_jax.models.tokenizer",
        "ucofia_jax.weights",
        "ucofia_jax.ops",
        "ucofia_jax.evaluation",
        "ucofia_jax.runtime",
        "data_pipeline",
        ERRORS,
    },
}
# Single modules allowed more than their layer, and why.
EXCEPTIONS = {
    # The parity tool checks the head itself (and the token shift) against the original's
    # golden fixtures, by the original's parameter names.
    "ucofia_jax.tools.parity": {"ucofia_jax.models.head", "ucofia_jax.models.ucofia_names"},
}
# Every layer may read the config's defaults and rules (ucofia_jax.config imports no layer).
for _layer, _layer_imports in ALLOWED.items():
    if _layer != ERRORS:
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
        allowed = ALLOWED[own] | EXCEPTIONS.get(name, set()) | {own}
        if other == own:
            continue
        if not any(target == a or target.startswith(a + ".") for a in allowed):
            bad.append(f"{path.relative_to(REPO)}:{line} imports {target} ({own} -> {other})")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_every_layer_has_modules():
    # A renamed package must not silently empty a rule.
    layers = {_layer(_module_name(p)) for p in _modules()}
    assert set(ALLOWED) <= layers
