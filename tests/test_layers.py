"""The layers import one way (docs/design.md, "Layers"): a module imports only from its own
package or from packages of lower layers. Checked on the source (every `import pltkit.x` and
`from pltkit.x ...`, at any depth in the file), so a lazy import inside a function counts too.
And the source stays in small pieces: no file over 350 lines, no function over 60."""

import ast
from pathlib import Path

import pltkit

# the layer of each package, lowest first; packages of one layer do not import each other
LAYERS = {"model": 0, "export": 1, "quant": 2, "runtime": 3, "gpu": 4, "train": 4, "serve": 5, "lsp": 5, "bench": 5, "cli": 6}
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


MAX_FILE_LINES, MAX_FUNCTION_LINES = 350, 60


def oversized(files: dict[str, str]) -> list[str]:
    """'path: N lines' for each file over MAX_FILE_LINES and 'path:line name: N lines' for each function
    over MAX_FUNCTION_LINES (its def line to its last line)."""
    found = []
    for path, source in files.items():
        if len(source.splitlines()) > MAX_FILE_LINES:
            found.append(f"{path}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"{path}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    return found


def test_files_and_functions_stay_small():
    assert oversized({str(f.relative_to(ROOT)): f.read_text() for f in ROOT.rglob("*.py")}) == []


def test_an_oversized_file_or_function_is_found():
    long_function = "def f():\n" + "    x = 1\n" * 60
    assert oversized({"a.py": long_function, "b.py": "x = 1\n" * 351, "c.py": "def g():\n" + "    x = 1\n" * 59}) == [
        "a.py:1 f: 61 lines", "b.py: 351 lines"]
