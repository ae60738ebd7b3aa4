"""The README's test command on a fresh machine: a missing system part skips with its install command, except in
CI, which must never skip; and CI runs exactly the README's test command."""

from __future__ import annotations

import re

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


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    tests_section = readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.+?)\n```", tests_section, re.S).group(1).strip()
    assert command == "pytest -q"
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    # CI installs the parts the tests would otherwise skip for.
    ci = (REPO / ".ci" / "run").read_text()
    assert "chromium" in ci and "default-jre-headless" in ci
