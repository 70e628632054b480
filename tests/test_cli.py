"""The CLI imports a recipe / bench module only when that command runs."""

import subprocess
import sys


def test_help_and_list_import_no_recipe():
    code = ("import sys; from eggroll import cli; cli.main(['list']);"
            "assert not any(m.startswith(('eggroll.recipes.', 'eggroll.bench.')) for m in sys.modules), "
            "[m for m in sys.modules if m.startswith('eggroll.')]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"recipes": ["cartpole"' in out.stdout  # other recipes may follow in the sorted list
