"""The package layers (pyproject's [tool.importlinter] contracts), checked by import-linter.

The contracts are checked on the real tree, and once more on a copy of it with one import
from the core to an outer package added, which must break the core's contract (and those of
the packages that reach the outer one through the core): a check that cannot fail would
prove nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LINT = Path(sys.executable).parent / "lint-imports"


def _package_dirs() -> dict[str, str]:
    """Import name -> folder, of the product's distribution and the dev tooling's."""
    dirs = dict(_setuptools(ROOT)["package-dir"])
    dirs.update(
        {name: str(Path("dev") / d) for name, d in _setuptools(ROOT / "dev")["package-dir"].items()}
    )
    return dirs


def _setuptools(project: Path) -> dict:
    return tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run(
        [str(LINT), str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy_tree(dest: Path) -> Path:
    """The project's packages under their import names, and its pyproject.toml."""
    for name, folder in _package_dirs().items():
        shutil.copytree(
            ROOT / folder,
            dest / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "pyproject.toml"),
        )
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_every_project_package_is_under_a_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert sorted(config["root_packages"]) == sorted(_package_dirs())


def test_the_layers_hold(tmp_path):
    out = _lint(_copy_tree(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 kept, 0 broken" in out.stdout


def test_a_back_edge_from_the_core_breaks_the_contract(tmp_path):
    tree = _copy_tree(tmp_path)
    errors = tree / "nec_serve" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    import nec_models  # noqa\n")
    out = _lint(tree)
    assert out.returncode != 0
    assert "The core imports no other package of the project BROKEN" in out.stdout
    assert "nec_serve.errors -> nec_models" in out.stdout, out.stdout
    # Everything above the core now reaches the models through it: broken as well.
    assert "The workflow services use the core only BROKEN" in out.stdout
