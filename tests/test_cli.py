"""The CLI imports a recipe / bench module only when that command runs; eggroll.config stands alone."""

import json
import subprocess
import sys


def test_help_and_list_import_no_recipe():
    code = ("import sys; from eggroll import cli; cli.main(['list']);"
            "assert not any(m.startswith(('eggroll.recipes.', 'eggroll.bench.')) for m in sys.modules), "
            "[m for m in sys.modules if m.startswith('eggroll.')]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cartpole" in json.loads(out.stdout.strip().splitlines()[-1])["recipes"]


def test_config_module_stands_alone():
    """eggroll.config imports neither the command line nor a recipe nor optax (until a lookup)."""
    code = ("import sys, eggroll; had_optax = 'optax' in sys.modules; from eggroll import config;"
            "assert not any(m == 'eggroll.cli' or m.startswith('eggroll.recipes.') for m in sys.modules);"
            "assert list(config.OPTIMIZERS) == ['adam', 'adamw', 'sgd'] and (had_optax or 'optax' not in sys.modules);"
            "import optax; assert config.OPTIMIZERS['sgd'] is optax.sgd and 'lion' not in config.OPTIMIZERS;"
            "from eggroll import cli; assert cli.flag is config.flag and cli.config_from_flags is config.config_from_flags")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_hidden_sizes():
    import pytest

    from eggroll.config import hidden_sizes

    assert hidden_sizes("64,64") == hidden_sizes("64 64") == hidden_sizes((64, 64)) == (64, 64)
    assert hidden_sizes(16) == (16,)
    for bad in ("", "0", "a,b", (1.5,), 0, ()):
        with pytest.raises(ValueError, match="hidden"):
            hidden_sizes(bad)
