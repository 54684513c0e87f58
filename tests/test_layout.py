"""The package's layering: the CLI sits on top and only it (and the benchmarks' own package)
may import the benchmarks; nothing imports the CLI. A lower module that reached up would make
the Python API depend on argument parsing, or pull a benchmark into every edit."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "imagic"


def imported_modules(path: Path) -> set[str]:
    """Every imagic module `path` imports, as a dotted name (relative imports resolved)."""
    package = ["imagic", *path.relative_to(SRC).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return {n for n in names if n == "imagic" or n.startswith("imagic.")}


MODULES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_below_the_cli_imports_the_cli_or_the_benchmarks(path):
    layer = path.relative_to(SRC).parts[0]
    layer = "cli" if layer == "__main__.py" else layer  # `python -m imagic` is the command
    forbidden = {"cli": (), "ui": ("imagic.bench",), "bench": ("imagic.cli",)}.get(
        layer, ("imagic.cli", "imagic.bench"))
    reaching_up = sorted(n for n in imported_modules(path)
                         if any(n == f or n.startswith(f + ".") for f in forbidden))
    assert not reaching_up, f"{path.relative_to(SRC)} imports {reaching_up}"


def test_the_import_check_sees_relative_imports(tmp_path):
    """The check above resolves `from ..bench import x` inside imagic/shapes/ to imagic.bench."""
    module = SRC / "shapes" / "train.py"
    names = imported_modules(module)
    assert "imagic.backends.cascade" in names and "imagic.errors.InputError" in names


def test_editor_holds_the_paper_and_no_gpu_policy():
    """editor.py reads as the paper's three stages: how steps run on a GPU lives in
    training.py, figures in docs/."""
    text = (SRC / "editor.py").read_text()
    for word in ("cuda_graphs", "torch.cuda", "GiB", "H100", "docs/"):
        assert word not in text, word
