"""The folders install under the petserve namespace and nothing else at the top level."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("adapters", "kernels", "serving", "benchmarks")


def test_namespace_from_outside_the_checkout(tmp_path):
    code = ("import importlib.util as u\n"
            "import petserve.adapters, petserve.kernels, petserve.serving, petserve.benchmarks\n"
            "for name in ('adapters', 'kernels', 'serving', 'benchmarks'):\n"
            "    spec = u.find_spec(name)\n"
            "    print(spec and spec.origin)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    adapters, kernels, serving, benchmarks = out.stdout.split()
    assert (adapters, serving, benchmarks) == ("None", "None", "None")
    # Hugging Face's kernels may be installed (transformers requires it); ours never is
    assert not Path(kernels).is_relative_to(ROOT / "kernels")


def test_checkout_root_does_not_shadow_hugging_face_kernels():
    """From the checkout root (pytest's rootdir, `python -m` commands) `import kernels` finds this
    folder first; it hands the import to Hugging Face's distribution, which transformers imports."""
    code = ("import sys, transformers.modeling_utils, kernels, petserve.kernels as ops\n"
            "print(kernels.CUDAProperties.__module__.split('.')[0], ops.add_lowrank.__module__)\n"
            "print(sys.path.count(''), sys.modules['kernels'] is kernels)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["kernels", "petserve.kernels.lowrank", "1", "True"]
    # pytest itself runs with the checkout root on sys.path
    assert str(ROOT) in sys.path
    assert not Path(importlib.import_module("kernels").__file__).is_relative_to(ROOT / "kernels")
    # without site-packages the real one is missing: the error says where petserve's ops live
    out = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "petserve's ops import as petserve.kernels" in out.stderr


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
