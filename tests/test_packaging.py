"""Packaging: our kernels install and import as `pipeline.kernels`, beside a foreign top-level
`kernels` package (Hugging Face's hub kernels, which transformers and bitsandbytes import)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent

# What a run needs from the kernels: both the Python modules and the C++ sources it compiles.
PROBE = (
    "import kernels, pipeline.engine.engine\n"
    "from pipeline import kernels as ours\n"
    "assert kernels.FOREIGN, kernels.__file__\n"
    "assert ours.select('cpu') in ('torch', 'triton')\n"
    "assert all(p.is_file() for p in ours.cpu.SOURCES + ours.cpu.HEADERS), ours.cpu.SOURCES\n"
    "print(ours.__file__)\n"
)


def _foreign_kernels(tmp_path: Path) -> Path:
    """A directory holding a top-level `kernels` package that is not ours."""
    site = tmp_path / "foreign"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("FOREIGN = True\n")
    return site


def _probe(cwd: Path, *path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_package_list_names_every_package():
    """pyproject lists the packages by hand (kernels/ is mapped to pipeline.kernels)."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_packages(str(ROOT), include=["pipeline*"])
    assert sorted(listed["packages"]) == sorted([*found, "pipeline.kernels"])
    assert listed["package-dir"] == {"pipeline.kernels": "kernels"}


def test_source_tree_beside_a_foreign_kernels_package(tmp_path):
    """Run from another directory with a foreign `kernels` earlier on the path (where an
    installed one sits): the pipeline still imports its own kernels, from the source tree."""
    out = _probe(tmp_path, _foreign_kernels(tmp_path), ROOT)
    assert Path(out) == ROOT / "kernels" / "__init__.py"


def test_wheel_installs_kernels_inside_the_package(tmp_path):
    """A built wheel holds the kernels (Python and C++) under pipeline/kernels and no
    top-level `kernels`, and runs installed beside a foreign one."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(wheels), str(ROOT)], check=True, timeout=600)
    (wheel,) = wheels.glob("pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")]
    for name in ("__init__.py", "cpu.py", "cpu_norm.cpp", "cpu_math.h"):
        assert f"pipeline/kernels/{name}" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip would install, without pip's work
    out = _probe(tmp_path, _foreign_kernels(tmp_path), site)
    assert Path(out) == site / "pipeline" / "kernels" / "__init__.py"
