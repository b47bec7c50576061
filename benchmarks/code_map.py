"""The package's map as a table: files and lines per package, the longest functions, imports
that cross the model's door, and what importing a config file loads.

  python benchmarks/code_map.py            (from the repository root)
"""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("ucofia_jax", "data_pipeline", "configs")
# The model's public door: what the tools above may import from ucofia_jax.models.
DOOR = ("ucofia_jax.models.model", "ucofia_jax.models.features")
TOOLS = ("ucofia_jax.training", "ucofia_jax.evaluation", "ucofia_jax.search", "ucofia_jax.tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "ucofia_jax" and len(parts) > 2 else parts[0]


def main() -> None:
    files = [p for r in ROOTS for p in sorted((REPO / r).rglob("*.py"))]
    per_package = defaultdict(lambda: [0, 0])
    functions = []
    crossings = []
    for path in files:
        name = module_name(path)
        text = path.read_text(encoding="utf-8")
        per_package[package_of(name)][0] += 1
        per_package[package_of(name)][1] += text.count("\n")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if name.startswith(TOOLS) and t.startswith("ucofia_jax.models."):
                    if not t.startswith(DOOR):
                        crossings.append(f"{name} -> {t}")
    print("| package | files | lines |\n|---|---:|---:|")
    for pkg, (n, lines) in sorted(per_package.items()):
        print(f"| {pkg} | {n} | {lines} |")
    print("\n| longest functions | lines |\n|---|---:|")
    for n, fn in sorted(functions, reverse=True)[:8]:
        print(f"| {fn} | {n} |")
    print(f"\nimports that cross the model's door ({len(crossings)}):")
    for c in sorted(crossings):
        print(f"  {c}")
    probe = (
        "import sys; sys.path.insert(0, '.'); import importlib.util as u; "
        "s = u.spec_from_file_location('c', 'configs/msrvtt.py'); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); m.get_config(); "
        "print(sorted({k.split('.')[0] for k in sys.modules} & "
        "{'jax', 'flax', 'tensorflow', 'tensorflow_datasets', 'orbax', 'optax'}))"
    )
    heavy = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    print(f"\nheavy packages loaded by importing configs/msrvtt.py: {heavy}")


if __name__ == "__main__":
    main()
