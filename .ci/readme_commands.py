"""The README's commands, as CI runs them: `python .ci/readme_commands.py setup|test` prints the command lines of
the first ```bash block under the README's "## Set-up" or "## Tests" heading, one per line, with comments and
blank lines dropped. `.ci/run` executes exactly these lines, so a README edit changes what CI does (and
tests/test_system_parts.py checks that the blocks are what a new user needs)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = {"setup": "Set-up", "test": "Tests"}


def block_lines(readme: str, heading: str) -> list[str]:
    """Command lines of the first bash block of the `## heading` section (shell comments stripped)."""
    parts = readme.split(f"\n## {heading}\n", 1)
    if len(parts) != 2:
        raise SystemExit(f"README.md has no '## {heading}' section")
    section = parts[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)\n```", section, re.S)
    if match is None:
        raise SystemExit(f"README.md's '## {heading}' section has no ```bash block")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SECTIONS:
        raise SystemExit(f"usage: {sys.argv[0]} {'|'.join(SECTIONS)}")
    print("\n".join(block_lines(README.read_text(), SECTIONS[sys.argv[1]])))
