"""The linter (ruff, configured in pyproject.toml; installed by requirements-dev.txt) finds
nothing: unused or undefined names and layout slips fail CI like a broken test."""
import importlib.util
import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    assert importlib.util.find_spec("ruff") is not None, "ruff is missing: pip install -r requirements-dev.txt"
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
