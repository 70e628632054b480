"""Config-field flags, shared option parsing and registries.

Every recipe, benchmark and tool describes its options as a `Config` dataclass whose fields are
made with `flag(default, help, choices)`; `add_dataclass_flags` turns those fields into argparse
flags and `parse_config` / `config_from_flags` parse a command line (or a flag string, presets
included) back into a Config. The `eggroll` command (cli.py) is built on these, and modules that
only need the field helper import it from here rather than from the command line.

Shared option values live here too: `hidden_sizes` parses an MLP's hidden sizes ('64,64', 64 or
(64, 64)) and `OPTIMIZERS` maps an optimizer flag's value to its optax constructor.

This module imports no recipe and not the command line (nor optax until an optimizer is looked
up), so anything may import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import shlex
import typing
from collections.abc import Callable, Iterator, Mapping

__all__ = ["OPTIMIZERS", "add_dataclass_flags", "config_from_flags", "flag", "flag_args", "hidden_sizes",
           "parse_config", "parse_into"]


def flag(default, help: str, choices=None):
    """A Config dataclass field that becomes a command-line flag: its help text and choices."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    return dataclasses.field(default=default, metadata=meta)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name` flag per field of the dataclass `cls` (booleans and `bool | None`: --x / --no-x)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f.metadata.get("help", "")
        args = typing.get_args(typ)
        if typ is bool or set(args) == {bool, type(None)}:  # bool | None: None when neither flag is given
            shown = "the preset's" if default is None else default
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{helptext} (default: {shown})")
            continue
        base = next((a for a in args if a is not type(None)), str) if args else typ
        choices = f.metadata.get("choices")
        parser.add_argument(name, type=base, default=default, choices=choices,
                            help=f"{helptext} (default: {default})")


def parse_into(cls, ns) -> object:
    """A `cls` instance from an argparse namespace holding one attribute per field."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def parse_config(parser: argparse.ArgumentParser, cls, argv, presets: dict | None = None):
    """Parse argv into a `cls` Config. With `presets` (a module's PRESETS) and --preset NAME, the
    preset's values become the defaults and the flags given explicitly win; the Config returned
    has the preset applied (its preset field cleared)."""
    ns = parser.parse_args(argv)
    name = getattr(ns, "preset", "")
    if presets and name:
        parser.set_defaults(**presets[name])
        ns = parser.parse_args(argv)
        ns.preset = ""
    return parse_into(cls, ns)


def config_from_flags(mod, flags: str, **fixed):
    """`mod.Config` from a flag string as `eggroll train/bench NAME` would parse it (presets
    included), then `fixed` fields replaced; bad flags raise ValueError naming the string."""

    class Raising(argparse.ArgumentParser):  # argparse prints usage and exits; we want one line
        def error(self, message):
            raise ValueError(f"--flags {flags!r}: not valid flags for {mod.__name__}: {message}")

    parser = Raising(prog=mod.__name__)
    add_dataclass_flags(parser, mod.Config)
    cfg = parse_config(parser, mod.Config, shlex.split(flags), getattr(mod, "PRESETS", None))
    return dataclasses.replace(cfg, **fixed)


def flag_args(values: Mapping) -> list[str]:
    """Command-line flags for Config field values: {"lr": 0.1, "obs_norm": False} -> ["--lr", "0.1",
    "--no-obs-norm"] (the flags `add_dataclass_flags` makes; searches print commands that reproduce
    a trial)."""
    out: list[str] = []
    for k, v in values.items():
        name = k.replace("_", "-")
        if isinstance(v, bool):  # booleans are switches: --x / --no-x
            out.append(f"--{name}" if v else f"--no-{name}")
        else:
            out += [f"--{name}", str(v)]
    return out


def hidden_sizes(hidden) -> tuple[int, ...]:
    """'16,16' / '16 16' / 16 / (16, 16) -> (16, 16); ValueError unless one or more positive integers."""
    if isinstance(hidden, numbers.Integral):
        hidden = (hidden,)
    if isinstance(hidden, str):
        parts = [p.strip() for p in hidden.replace(" ", ",").split(",") if p.strip()]
        try:
            hidden = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"hidden must be comma-separated positive integers, got {hidden!r}") from None
    hidden = tuple(hidden)
    if not hidden or any(not isinstance(h, numbers.Integral) or h < 1 for h in hidden):
        raise ValueError(f"hidden must be one or more positive integers, got {hidden!r}")
    return tuple(int(h) for h in hidden)


class _OptaxRegistry(Mapping):
    """name -> optax constructor (`optax.<name>`), imported on first lookup: listing the names
    (a flag's choices) does not import optax / jax."""

    def __init__(self, names: tuple[str, ...]):
        self._names = names

    def __getitem__(self, name: str) -> Callable:
        if name not in self._names:
            raise KeyError(name)
        import optax

        return getattr(optax, name)

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"OPTIMIZERS({', '.join(self._names)})"


# optimizer flag value -> optax constructor, called as OPTIMIZERS[name](learning_rate, **kwargs)
OPTIMIZERS: Mapping[str, Callable] = _OptaxRegistry(("adam", "adamw", "sgd"))
