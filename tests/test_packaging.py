"""An installed pf_jax (a wheel, not an editable checkout) finds its shipped recipes wherever it runs: the
default recipe, the built-in base model's recipe, the dry run's model configs and the CPU kernels' source
are package data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """pf_jax built into a wheel from a copy of the sources and installed (without its dependencies, which
    this environment has) into a folder of its own; returns that folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "pf_jax", src / "pf_jax", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, cwd=tmp, timeout=300)
    wheel = next((tmp / "dist").glob("pf_jax-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   timeout=300)
    return tmp / "site"


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_ships_the_recipes(installed):
    configs = installed / "pf_jax" / "configs"
    for name in ("default.yaml", "arith/base.yaml", "arith/common.yaml", "models/qwen2.5-math-7b.json",
                 "eval/word_problems.jsonl", "eval/word_problems_template.txt"):
        assert (configs / name).is_file(), name
    assert (installed / "pf_jax" / "kernels" / "skinny_matmul.cc").is_file()


def test_the_installed_train_finds_its_default_recipe_from_another_directory(installed, tmp_path):
    where = _run(installed, tmp_path, "-c", "import pf_jax; print(pf_jax.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed)  # not this checkout
    out = _run(installed, tmp_path, "-m", "pf_jax.train", "--dry-run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "powerflow on arith-base" in out.stdout  # configs/default.yaml, sized from configs/arith/base.yaml
    assert not (tmp_path / "runs").exists()  # a dry run builds nothing
