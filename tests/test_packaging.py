"""The folders install under the petserve namespace and nothing else at the top level."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("adapters", "kernels", "serving", "benchmarks")


def test_namespace_from_outside_the_checkout(tmp_path):
    code = ("import importlib.util as u\n"
            "import petserve.adapters, petserve.kernels, petserve.serving, petserve.benchmarks\n"
            "print(u.find_spec('adapters'), u.find_spec('kernels'), u.find_spec('serving'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["None", "None", "None"]


def test_every_package_folder_is_listed():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {f"petserve.{f}": f for f in FOLDERS}
    found = {"petserve." + ".".join(p.parent.relative_to(ROOT).parts)
             for f in FOLDERS for p in (ROOT / f).rglob("__init__.py")}
    assert set(setup["packages"]) == found
    # a folder of .py files without __init__.py would be left out of a wheel
    for f in FOLDERS:
        for d in (ROOT / f).rglob("*.py"):
            assert (d.parent / "__init__.py").exists(), d.parent
