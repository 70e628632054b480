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


def test_flag_args_round_trip_through_the_flags():
    """The flags a search prints parse back to the same Config values (booleans as switches)."""
    import argparse
    import dataclasses

    from eggroll.config import add_dataclass_flags, flag, flag_args, parse_config

    @dataclasses.dataclass
    class C:
        lr: float = flag(0.1, "learning rate")
        obs_norm: bool = flag(True, "normalise observations")
        hidden: str = flag("64,64", "hidden sizes")

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, C)
    values = {"lr": 0.025, "obs_norm": False, "hidden": "32"}
    assert dataclasses.asdict(parse_config(parser, C, flag_args(values))) == values
