"""Command line: `eggroll train RECIPE [flags]`, `eggroll bench NAME [flags]`, `eggroll list`.

Recipes (eggroll.recipes.RECIPES) each expose a `Config` dataclass and `run(cfg) -> dict`; their
flags are generated from the dataclass fields, so `eggroll train cartpole --help` lists them.
Benchmarks (eggroll.bench.BENCHES) expose `Config` and `run(cfg) -> dict` the same way and print
one JSON object as their last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing

RECIPES = {"cartpole": "eggroll.recipes.cartpole"}
BENCHES = {"throughput": "eggroll.bench.throughput"}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f.metadata.get("help", "")
        if typ is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{helptext} (default: {default})")
            continue
        args = typing.get_args(typ)
        base = next((a for a in args if a is not type(None)), str) if args else typ
        choices = f.metadata.get("choices")
        parser.add_argument(name, type=base, default=default, choices=choices,
                            help=f"{helptext} (default: {default})")


def _parse_into(cls, ns) -> object:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="eggroll", description="Evolution strategies with low-rank perturbations (EGGROLL) in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training recipe")
    tsub = train.add_subparsers(dest="name", required=True)
    bench = sub.add_parser("bench", help="run a benchmark (last line of output is JSON)")
    bsub = bench.add_subparsers(dest="name", required=True)
    sub.add_parser("list", help="list recipes and benchmarks")
    modules = {}
    for table, group in ((RECIPES, tsub), (BENCHES, bsub)):
        for name, modname in table.items():
            mod = importlib.import_module(modname)
            p = group.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
            _add_dataclass_flags(p, mod.Config)
            modules[(id(group), name)] = (mod, group)
    args = parser.parse_args(argv)
    if args.command == "list":
        print(json.dumps({"recipes": sorted(RECIPES), "benches": sorted(BENCHES)}))
        return 0
    group = tsub if args.command == "train" else bsub
    mod, _ = modules[(id(group), args.name)]
    try:
        result = mod.run(_parse_into(mod.Config, args))
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
        # bad flags / config: one clear line, not a traceback
        print(f"eggroll {args.command} {args.name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eggroll {args.command} {args.name}: interrupted (resume with --resume where supported)", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
