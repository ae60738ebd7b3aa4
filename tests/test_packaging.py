"""The shipped model travels with the package: a wheel built from the repository carries it, and once installed
(not editable) the `captioner` command captions a photo from any folder with no variable set."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from captioner.api import load_captioner
from tests.conftest import REPO

PHOTO = "000000024585.jpg"  # coco-mini/val: an aeroplane
SOURCES = ("pyproject.toml", "README.md", "captioner", "service")


def running_package_folders() -> list[str]:
    """Where the interpreter running the tests finds its installed packages: a venv's, or the system's, and any
    package folder a .pth file put on its path (never the checkout: that would hide what the wheel installs)."""
    paths = sysconfig.get_paths()
    added = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return list(dict.fromkeys([paths["purelib"], paths["platlib"], *site.getsitepackages(), *added]))


def test_wheel_carries_the_shipped_model_and_captions_from_another_folder(tmp_path, coco_mini, shipped_checkpoint):
    # Build from a copy of the sources: the build writes build/ and *.egg-info next to them.
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "-q", "-w", str(dist)], check=True)
    (wheel,) = dist.glob("captioner-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = archive.getinfo("captioner/weights/captioner-default.pt")
        assert packed.file_size == shipped_checkpoint.stat().st_size

    # A fresh venv that reuses the packages of the interpreter running these tests (torch among them) and gets
    # the wheel, without its deps. Not `--system-site-packages`: inside a venv that gives the *base* Python's
    # site-packages, where nothing is installed. A .pth file naming this interpreter's package folders comes after
    # the new venv's own site-packages (so the wheel wins), and its folders' own .pth files are not run (so an
    # editable install of the checkout stays out).
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "running-interpreter.pth").write_text("\n".join(running_package_folders()) + "\n")
    # No PYTHONPATH anywhere: pip must not take a checkout on it for an installed captioner, nor Python import it.
    env = {k: v for k, v in os.environ.items() if k not in ("CAPTIONER_CHECKPOINT", "PYTHONPATH")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-cache-dir",
                    "--force-reinstall", "-q", str(wheel)], env=env, check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import captioner.api as a; print(a.default_checkpoint_path())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_file() and Path(where).is_relative_to(venv), where  # the installed copy, not the repo's

    photo = coco_mini / "val" / PHOTO
    run = subprocess.run([str(venv / "bin" / "captioner"), "caption", str(photo), "--json"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    line = json.loads(run.stdout)
    assert line["image"] == str(photo)
    assert line["caption"] == load_captioner(shipped_checkpoint).caption([photo])[0].caption
