"""The package is whole when installed from a wheel: its defaults (demo VAE, presets) are package data.

Builds the wheel from a copy of the working tree (offline: no build isolation), installs it into a fresh
venv whose only other packages are this environment's (torch & co., through a .pth; the checkout's own
editable install is not on that path), and runs the console script with the built-in defaults from a
folder outside the repository.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ("revq_pipe/demo/vae/config.json", "revq_pipe/demo/vae/diffusion_pytorch_model.safetensors",
                "revq_pipe/demo/vae/training_recipe.json", "revq_pipe/configs/demo.yaml",
                "revq_pipe/configs/512T.yaml", "revq_pipe/configs/_imagenet.yaml")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps` of the working tree (tracked and new, not ignored, files)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out)],
        cwd=source)
    (built,) = out.glob("revq_pipe-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A venv holding only the wheel; this environment's packages (torch, diffusers, ...) reach it through a .pth."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    (Path(site) / "project_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
         str(wheel)])
    return venv


def test_the_wheel_holds_the_demo_vae_and_the_presets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in PACKAGE_DATA if name not in names]
    assert not missing, missing
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert re.search(r"^Requires-Dist: diffusers[^;]*<", metadata, re.M), "diffusers has an upper bound"


def test_every_module_the_package_imports_is_a_declared_dependency():
    """Third-party imports of pipeline/, cache/, stages/, demo/ against pyproject's dependencies (scipy & co. are
    the tests' own, an extra); a module imported but not declared breaks an install from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(req) for req in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    imported = {}
    for folder in ("pipeline", "cache", "stages", "demo"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "revq_pipe":
                        imported.setdefault(top, str(path.relative_to(REPO)))
    undeclared = {module: where for module, where in imported.items()
                  if not {_name(d) for d in distributions.get(module, [module])} & declared}
    assert not undeclared, undeclared
    tests_only = {_name(req) for req in project["optional-dependencies"]["test"]} - declared
    assert "scipy" in tests_only and not {m for m in imported if _name(m) in tests_only}


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string ("moto[server]>=5.0" -> "moto")."""
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.slow
def test_the_installed_wheel_runs_with_its_defaults_from_any_folder(installed, tmp_path):
    """`demo images` and `encode` with the built-in defaults (the packaged demo VAE), a preset by name, from a
    folder outside the checkout and with paths.root where the user says."""
    work, root = tmp_path / "work", tmp_path / "elsewhere" / "root"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REVQ_DEBUG")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    cli = str(installed / "bin" / "revq-pipe")

    where = run([str(installed / "bin" / "python"), "-c", "import revq_pipe.stages.config as c; print(c.__file__, "
                 "c.DEMO_VAE)"], cwd=work, env=env).stdout.split()
    assert all(path.startswith(str(installed)) for path in where), where
    assert "codebook_size: 16384" in run([cli, "config", "--config", "512T"], cwd=work, env=env).stdout

    run([cli, "demo", "images", "--set", f"paths.root={root}"], cwd=work, env=env)
    run([cli, "encode", "--split", "val", "--set", f"paths.root={root}", "--set", "encode.num_workers=0"],
        cwd=work, env=env)
    info = json.loads(run([cli, "cache", "info", str(root / "cache" / "val.zarr")], cwd=work, env=env).stdout)
    assert info["complete"] and info["num_samples"] == 512 and info["latent_shape"] == [32, 8, 8]
    assert info["vae"]["source"] == where[1] and info["vae"]["source"].startswith(str(installed))
    assert sorted(p.name for p in work.iterdir()) == [], "nothing lands in the current folder"
