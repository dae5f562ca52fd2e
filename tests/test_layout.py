"""The shape of the house: layers point down, the config loads without torch, every CLI has its
``python -m`` and console-script forms, and the documented entry script shadows nothing."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the project packages it may import (layers point down: core <- preprocessing <- pipeline)
ALLOWED = {"core": {"core"}, "preprocessing": {"core", "preprocessing"}, "pipeline": {"core", "pipeline"}}


def _imported_project_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {name.split(".")[0] for name in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package: str) -> None:
    wrong = {str(p.relative_to(ROOT)): sorted(_imported_project_packages(p) - ALLOWED[package])
             for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in wrong.items() if v}, f"{package} imports a layer above it: {wrong}"


def _modules_after_import(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("statement", [
    "import pipeline.config",
    "from pipeline.config import load_config; load_config('configs/experiment/demo.yaml', ['trainer.epochs=2'])",
    "import core.storage, core.s3, core.manifest, core.redact, core.errors, core.loopback",
    "import preprocessing.cli",
])
def test_schema_and_core_load_without_torch_or_ray(statement: str) -> None:
    loaded = _modules_after_import(statement)
    assert not {"torch", "ray"} & loaded, f"{statement!r} loads {sorted({'torch', 'ray'} & loaded)}"


def test_the_entry_script_shadows_no_installed_module(tmp_path: Path) -> None:
    """``python pipeline/train.py`` puts ``pipeline/`` first on sys.path: none of its modules may share a
    name with a module the interpreter could otherwise import (it would replace that module)."""
    here = ROOT / "pipeline"
    names = sorted({p.stem for p in here.glob("*.py")} - {"__init__"}
                   | {p.name for p in here.iterdir() if (p / "__init__.py").exists()})
    # A fresh interpreter outside the checkout (-P: no script or current folder on sys.path) sees what
    # is installed, and nothing of this repository but the installed project itself.
    code = "import importlib.util, sys; print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    out = subprocess.run([sys.executable, "-P", "-c", code, *names], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    clashes = ast.literal_eval(out.stdout.strip())
    assert not clashes, f"modules in pipeline/ shadow installed modules when run as a script: {clashes}"


def test_entry_runs_as_script_module_and_console_script(tmp_path: Path) -> None:
    forms = [[sys.executable, "pipeline/train.py"], [sys.executable, "-m", "pipeline.train"],
             [str(Path(sys.executable).with_name("mvit-train"))]]
    for form in forms:
        out = subprocess.run([*form, "--config", "configs/experiment/demo.yaml", "--print-config"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "name: demo" in out.stdout, (form, out.stderr[-2000:])


def test_every_console_script_is_a_python_m_module_with_help() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    modules = {"mvit-train": "pipeline.train", "mvit-preprocess": "preprocessing", "mvit-models": "pipeline.models",
               "mvit-compare": "pipeline.compare", "mvit-local-cluster": "pipeline.local_cluster"}
    assert set(scripts) == set(modules)
    for script, module in modules.items():
        for form in ([str(Path(sys.executable).with_name(script))], [sys.executable, "-m", module]):
            out = subprocess.run([*form, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "usage" in out.stdout.lower(), (form, out.stderr[-2000:])
