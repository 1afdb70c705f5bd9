"""Declared dependency floors are true: the package's source uses no API newer than them.

pyproject.toml declares the floors (torch >= 2.1, torchvision >= 0.16, shapely >= 2.0, ...).
``NEWER_APIS`` lists APIs that appeared (or changed) after a floor, with the release that
brought them; a use is allowed only inside a function listed with it, where it is guarded
(feature test or version check, with a fallback or a clear error). A new unguarded use of
such an API, or a lowered floor, fails here. ``.ci/floors`` runs the code itself on the
floor versions when they can be installed.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "dbnetpp").rglob("*.py"), *(ROOT / "examples").glob("*.py")])

# What pyproject.toml must declare (package -> minimum version). No tighter pins: the package
# is meant to run on these.
FLOORS = {
    "torch": (2, 1),
    "torchvision": (0, 16),
    "numpy": (1, 24),
    "opencv-python": (4, 5),
    "shapely": (2, 0),
    "pyclipper": (1, 3),
    "tqdm": (4, 50),
}

# regex on the source -> (package, release that introduced it, functions where it is guarded)
NEWER_APIS = {
    r"torch\.amp\.GradScaler\s*\(": ("torch", (2, 3), set()),  # use dbnetpp.engine.make_grad_scaler
    r"getattr\(torch\.amp, \"GradScaler\"": ("torch", (2, 3), {"make_grad_scaler"}),
    r"torch\.serialization\.safe_globals": ("torch", (2, 5), {"_load_with_stand_ins"}),
    r"torch\.serialization\.add_safe_globals": ("torch", (2, 4), set()),
    r"get_unsafe_globals_in_checkpoint": ("torch", (2, 5), {"_load_with_stand_ins"}),
    r"dynamo\s*=\s*True": ("torch", (2, 5), {"export_onnx", "_export_fp32"}),  # torch.onnx.export's dynamo flag
    r"\boptimize\s*=\s*True": ("torch", (2, 6), {"export_onnx", "_export_fp32"}),
    r"torch\.export\.Dim": ("torch", (2, 2), {"export_onnx", "_export_fp32"}),
    r"torch\.compiler\.": ("torch", (2, 3), set()),
    r"compiler, \"is_compiling\"": ("torch", (2, 3), {"is_compiling"}),  # torch.compiler.is_compiling via getattr
    r"\"custom_op\"": ("torch", (2, 4), {"_register_ops"}),  # torch.library.custom_op via getattr
    r"\.set_submodule\(": ("torch", (2, 3), set()),
    r"torch\.library\.custom_op": ("torch", (2, 4), set()),
    r"torch\.amp\.custom_(fwd|bwd)": ("torch", (2, 4), set()),
    r"torch\.get_default_device": ("torch", (2, 3), set()),
    r"torch\.utils\.swap_tensors|module_load\(": ("torch", (2, 3), set()),
    r"torch\.nn\.attention": ("torch", (2, 2), set()),
    r"in_order\s*=": ("torch", (2, 6), set()),  # DataLoader(in_order=...)
    r"\.check\(\[": ("torch", (2, 2), {"_has_key"}),  # Store.check: missing on HashStore in 2.1
    r"torchvision\.transforms\.v2|torchvision\.tv_tensors": ("torchvision", (0, 16), set()),
    r"np\.(concat|unstack|trapezoid|isdtype|astype|cumulative_sum|cumulative_prod|permute_dims)\(": (
        "numpy", (2, 0), set()),
    r"np\.linalg\.(vecdot|matrix_transpose|vector_norm)\(": ("numpy", (2, 0), set()),
    r"np\.(bool|int|float|object)\b(?!_)": ("numpy", (99, 0), set()),  # removed aliases (1.24)
}


def version_tuple(text):
    return tuple(int(v) for v in re.findall(r"\d+", text)[:2])


def declared_floors():
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
    floors = {}
    for spec in re.findall(r"\"([^\"]+)\"", block):
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9.]+))?\s*", spec)
        assert match, f"pyproject dependency {spec!r}: only 'name' or 'name>=X.Y' (no upper pins)"
        floors[match.group(1).lower()] = version_tuple(match.group(2)) if match.group(2) else None
    return floors


def enclosing_functions(path):
    """line number -> name of the innermost function containing it."""
    tree = ast.parse(path.read_text(), str(path))
    owner = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                if line not in owner or owner[line][0] < node.lineno:
                    owner[line] = (node.lineno, node.name)
    return {line: name for line, (_, name) in owner.items()}


def test_pyproject_declares_the_floors():
    floors = declared_floors()
    for package, version in FLOORS.items():
        assert floors.get(package) == version, f"pyproject.toml must declare {package}>={'.'.join(map(str, version))}"


def code_lines(path):
    """(line number, code without comments and docstring-only lines)."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        code = line.split("#", 1)[0]
        if code.strip() and not code.strip().startswith(("\"", "'", "``")):
            yield number, code


def test_no_api_newer_than_the_floors_outside_guards():
    floors = declared_floors()
    problems = []
    for path in SOURCES:
        owners = None
        for number, code in code_lines(path):
            for pattern, (package, since, guarded_in) in NEWER_APIS.items():
                if not re.search(pattern, code) or since <= floors[package]:
                    continue
                owners = owners if owners is not None else enclosing_functions(path)
                if owners.get(number) not in guarded_in:
                    where = f"{path.relative_to(ROOT)}:{number}"
                    problems.append(f"{where}: {code.strip()} -- needs {package} {'.'.join(map(str, since))}")
    assert not problems, "APIs newer than the declared floors:\n" + "\n".join(problems)


def test_torch_load_always_states_weights_only():
    """torch.load's weights_only default changed in torch 2.6: every call must say which."""
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                assert "weights_only" in {k.arg for k in node.keywords}, f"{path.relative_to(ROOT)}:{node.lineno}"


@pytest.mark.parametrize(
    "snippet",
    [
        "scaler = torch.amp.GradScaler('cuda')",
        "with torch.serialization.safe_globals([]): pass",
        "x = np.concat([a, b])",
        "m.set_submodule('a', b)",
    ],
)
def test_the_check_catches_a_newer_api(tmp_path, monkeypatch, snippet):
    """The scan is not vacuous: a module using a newer API outside a guard is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(f"def f():\n    {snippet}\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "SOURCES", [bad])
    monkeypatch.setattr(module, "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="bad.py:2"):
        test_no_api_newer_than_the_floors_outside_guards()
