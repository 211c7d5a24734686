"""The release: `python -m build` makes an sdist and, from it, a wheel that installs into a clean virtual environment
and answers `trl-dpo-plus losses`; the wheel carries every package-data file (embedded model, card template)."""

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "trl_dpo_plus").rglob("*"))
                if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]


@pytest.mark.slow
def test_sdist_and_wheel_install_in_a_clean_venv_and_list_the_losses(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", "site"))
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("trl_dpo_plus-*.whl")
    assert len(list((tmp_path / "dist").glob("trl_dpo_plus-*.tar.gz"))) == 1
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PACKAGE_DATA and not [f for f in PACKAGE_DATA if f not in names]  # the wheel was built from the sdist
    assert "trl_dpo_plus/py.typed" in names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Dist: trl<2,>=1.16" in metadata
    assert "Deprecat" not in built.stdout + built.stderr, "the build warns: " + (built.stdout + built.stderr)[-2000:]

    venv.create(tmp_path / "env", with_pip=True)
    python = tmp_path / "env" / "bin" / "python"
    # --no-deps: `losses` needs nothing beyond the package itself (torch and TRL are imported only for training)
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    listed = subprocess.run([str(tmp_path / "env" / "bin" / "trl-dpo-plus"), "losses"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "sigmoid" in listed.stdout and "simpo" in listed.stdout and len(listed.stdout.splitlines()) == 27
