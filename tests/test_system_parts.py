"""The README's test command on a fresh machine: a missing system part skips with its install command, except in
CI, which must never skip; and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import CHROMIUM, JAVA, require_command

MISSING = ("no-such-command-for-captioner-tests",)


def test_a_missing_part_skips_with_its_install_command(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=re.escape("`apt-get install chromium`")):
        require_command(MISSING, CHROMIUM[1], CHROMIUM[2])


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_ci_fails_instead_of_skipping(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=re.escape("`apt-get install default-jre-headless`")):
        require_command(MISSING, JAVA[1], JAVA[2])


def test_a_present_part_is_found(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_command(("no-such-command", "python3"), "apt-get install python3", "this test").endswith("python3")


def readme_block(section: str) -> list[str]:
    """What .ci/run runs for a README section: the lines .ci/readme_commands.py prints."""
    run = subprocess.run([sys.executable, str(REPO / ".ci" / "readme_commands.py"), section],
                         capture_output=True, text=True, check=True)
    return run.stdout.splitlines()


def test_the_readme_setup_makes_a_venv_before_installing():
    # PEP 668: a stock Debian/Ubuntu Python refuses `pip install` outside a virtual environment.
    setup = readme_block("setup")
    assert any(" -m venv " in line and "bin/activate" in line for line in setup[:1]), setup
    assert any(line.startswith("pip install") and ".[dev]" in line for line in setup[1:]), setup
    quick_start = (REPO / "README.md").read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert all(line in quick_start for line in setup), "the quick start installs differently from the set-up"


def test_ci_runs_the_readme_commands_verbatim_in_a_fresh_venv():
    assert readme_block("test") == ["pytest -q"]
    ci = (REPO / ".ci" / "run").read_text()
    # CI reads the commands from README.md, so the two cannot drift apart ...
    assert "readme_commands.py setup" in ci and "readme_commands.py test" in ci
    assert "pip install" not in ci and "pytest" not in ci.replace("readme_commands.py test", "")
    # ... runs them in a new venv outside the checkout, and installs the parts the tests would otherwise skip for.
    assert "mktemp -d" in ci and "VIRTUAL_ENV" in ci
    assert "chromium" in ci and "default-jre-headless" in ci


def test_the_readme_extractor_drops_comments_and_refuses_a_missing_block():
    extractor = runpy.run_path(str(REPO / ".ci" / "readme_commands.py"))
    readme = ("# x\n\n## Set-up\n\ntext\n\n```bash\n# a comment\npip install -e \".[dev]\"  # why\n\n```\n\n"
              "## Tests\nnone\n")
    assert extractor["block_lines"](readme, "Set-up") == ['pip install -e ".[dev]"']
    with pytest.raises(SystemExit, match="no ```bash block"):
        extractor["block_lines"](readme, "Tests")
    with pytest.raises(SystemExit, match="no '## Train' section"):
        extractor["block_lines"](readme, "Train")
