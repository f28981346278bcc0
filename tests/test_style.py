"""The repository passes its own linters (configured in pyproject.toml): ruff, ruff format and mypy."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"])
def test_ruff(command):
    result = run(sys.executable, "-m", "ruff", *command)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy():
    result = run(sys.executable, "-m", "mypy", "jpaged", "models", "pallas_kernels", "server")
    assert result.returncode == 0, result.stdout + result.stderr
