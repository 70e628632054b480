"""The README's quickstart runs as written and learns."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs_and_learns():
    text = README.read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    # as a newcomer runs it: one CPU device (not the 4 forced by conftest)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    mse = float(out.stdout.strip().split()[-1])
    assert mse < 0.2  # plain predictor of 0 has mse ~0.46 on this data


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in text and "pytest" in text
    assert 'pip install -q -e ".[test]"' in ci and "pytest" in ci
