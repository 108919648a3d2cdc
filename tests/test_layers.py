"""The package's layers import one way: formats <- quantized_weight <- kernels <- nn <- models <-
methods <- engine <- io / eval <- api <- cli. A lower layer never imports a higher one, not even
inside a function (a lazy import hides the same dependency)."""

import ast
import pathlib

import lowbit

ROOT = pathlib.Path(lowbit.__file__).parent

# rank of each top-level part of the package; equal ranks may import each other
LAYERS = {
    "assets": 0, "catalog": 0, "files": 0, "coverage": 0, "timing": 0, "formats": 0, "observers": 0, "data": 0,
    "quantized_weight": 1,
    "kernels": 2,
    "nn": 3,
    "models": 4,
    "methods": 5,
    "engine": 6,
    "io": 7, "eval": 7, "generate": 7, "fused_decode": 7, "report": 7,
    "api": 8, "plan": 8, "compare": 8,
    "cli": 9, "demo": 9, "__init__": 9, "__main__": 9,
}  # fmt: skip


def part_of(module: str) -> str:
    """``lowbit.nn.qmodule`` -> ``nn``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lowbit"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit") and node.level == 0:
            found.add(node.module)
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}  # fmt: skip
    assert parts <= set(LAYERS), f"give these a layer in LAYERS: {sorted(parts - set(LAYERS))}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        me = part_of(".".join(rel.parts))
        for target in imports(path):
            if LAYERS[part_of(target)] > LAYERS[me]:
                bad.append(f"{'.'.join(rel.parts)} ({me}) imports {target} ({part_of(target)})")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))
