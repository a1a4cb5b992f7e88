"""The layers import one way (docs/design.md, "Layers"): a module imports only from its own
package or from packages of lower layers. Checked on the source (every `import pltkit.x` and
`from pltkit.x ...`, at any depth in the file), so a lazy import inside a function counts too."""

import ast
from pathlib import Path

import pltkit

# the layer of each package, lowest first; packages of one layer do not import each other
LAYERS = {"model": 0, "export": 1, "quant": 2, "runtime": 3, "gpu": 4, "train": 4, "serve": 5, "bench": 5, "cli": 6}
ROOT = Path(pltkit.__file__).parent


def violations(files: dict[str, str]) -> list[str]:
    """'path:line: a -> pltkit.b' for each import of a package at the same or a higher layer;
    files: path relative to the pltkit folder -> source."""
    found = []
    for path, source in files.items():
        package = Path(path).parts[0]
        if package not in LAYERS:
            continue
        for node in ast.walk(ast.parse(source)):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "pltkit" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != package \
                        and LAYERS[parts[1]] >= LAYERS[package]:
                    found.append(f"{path}:{node.lineno}: {package} -> {name}")
    return found


def test_the_layers_import_one_way():
    files = {str(f.relative_to(ROOT)): f.read_text() for f in ROOT.rglob("*.py")}
    assert set(LAYERS) == {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}, "a package without a layer"
    assert violations(files) == []


def test_an_upward_or_sideways_import_is_found():
    assert violations({"model/x.py": "from pltkit.runtime.engine import Engine\n",
                       "runtime/y.py": "def f():\n    import pltkit.gpu.trt_backend\n",
                       "gpu/z.py": "from pltkit.train import data\n",
                       "export/ok.py": "from pltkit.model.config import PLTConfig\nimport numpy\n"}) == [
        "model/x.py:1: model -> pltkit.runtime.engine", "runtime/y.py:2: runtime -> pltkit.gpu.trt_backend",
        "gpu/z.py:1: gpu -> pltkit.train"]
