"""Command line: `eggroll train RECIPE [flags]`, `eggroll bench NAME [flags]`, `eggroll TOOL [flags]`,
`eggroll list`.

Several processes / machines (docs/DISTRIBUTED.md): `--coordinator HOST:PORT --num-processes P
--process-id I` anywhere on the command line (or EGGROLL_COORDINATOR / EGGROLL_NUM_PROCESSES /
EGGROLL_PROCESS_ID, or a Slurm job step with several tasks) initialise jax.distributed before
the recipe runs; `--peer-timeout S` bounds how long a process waits for a dead peer.

Recipes (RECIPES below), benchmarks (BENCHES) and stand-alone tools (TOOLS, e.g. `eggroll sample`)
each expose a `Config` dataclass and `run(cfg) -> dict`; their flags are generated from the
dataclass fields (eggroll.config), so `eggroll train cartpole --help` lists them. The result
dict is printed as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

# the Config-field helpers live in eggroll.config; re-exported here for older imports
from .config import add_dataclass_flags, config_from_flags, flag, parse_config, parse_into  # noqa: F401

# name -> (module, one-line description). Modules are imported only when their command runs,
# so a recipe's optional dependencies never break the others (or `eggroll --help`).
# One entry per line, please: each recipe / bench / tool adds exactly one line here.
RECIPES = {
    "cartpole": ("eggroll.recipes.cartpole", "MLP policy on gymnax CartPole-v1 (EGGROLL or OpenES)"),
    "egg": ("eggroll.recipes.egg", "integer-only (int8) minGRU byte LM pretrained with integer EGGROLL"),
    "egg-backprop": ("eggroll.recipes.egg_backprop", "float32 minGRU byte LM trained by backprop (baseline for EGG)"),
    "countdown-mini": ("eggroll.recipes.countdown_mini", "tiny transformer on Countdown: SFT, then EGGROLL vs GRPO at equal time"),
    "llm": ("eggroll.recipes.llm", "fine-tune a Hugging Face LLM on countdown / gsm8k with EGGROLL or GRPO"),
    "rl": ("eggroll.recipes.rl", "any JAX RL env (gymnax, brax, jumanji, navix, craftax, MPE...): EGGROLL, OpenES or PPO"),
}
BENCHES = {
    "throughput": ("eggroll.bench.throughput", "population forward / update / generation vs batched inference and OpenES"),
    "scaling": ("eggroll.bench.scaling", "bytes sent per generation (two model sizes) and population-step scaling over 1, 2, 4 devices / 2 processes"),
    "egg-population": ("eggroll.bench.egg_population", "EGG held-out bits/byte and peak RSS vs population (fixed generations, chunk)"),
    "egg-throughput": ("eggroll.bench.egg_throughput", "EGG member-bytes/s of one training generation vs the int8 GEMM bound"),
    "egg-signal": ("eggroll.bench.egg_signal", "EGG signal diagnostic: agreement of the weight changes of two runs differing only in noise seed"),
    "generate": ("eggroll.bench.generate", "LLM sampler: generation with per-member noise vs plain batched generation"),
    "gpu": ("eggroll.bench.gpu", "the one accelerator check: time-boxed throughput / EGG / sampler / countdown / RL parts (--tiny on CPU)"),
    "rl": ("eggroll.bench.rl", "EGGROLL vs OpenES vs PPO on several RL envs: results table, curves, speed ratios"),
    "ppo-reference": ("eggroll.bench.ppo_reference", "our PPO vs a maintained one (rejax on gymnax, brax's own on brax) at equal env steps and hyperparameters"),
}
TOOLS = {
    "sample": ("eggroll.recipes.egg_sample", "generate text from a trained EGG checkpoint"),
    "corpus": ("eggroll.corpus", "convert a text corpus into the byte cache; print split sizes and n-gram bits/byte"),
    "tune": ("eggroll.tune", "random search over the rl recipe's hyperparameters for any env (ES or PPO)"),
    "search-countdown": ("eggroll.recipes.countdown_search", "equal-budget hyperparameter search of EGGROLL vs GRPO on countdown-mini (resumable)"),
}


def _distributed_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("several processes (jax.distributed; docs/DISTRIBUTED.md)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (env EGGROLL_COORDINATOR)")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes (env EGGROLL_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0..P-1 (env EGGROLL_PROCESS_ID)")
    g.add_argument("--peer-timeout", type=float, default=None,
                   help="seconds without a peer's heartbeat before giving up (default 30; env EGGROLL_PEER_TIMEOUT)")


def _multi_process_ready(mod) -> bool:
    """A command runs under several processes when the run harness drives it (its Config
    inherits harness.RunConfig: process 0 writes, every process reads, global device counts) or
    when the module says so itself (MULTI_PROCESS = True)."""
    from .harness import RunConfig

    return bool(getattr(mod, "MULTI_PROCESS", False)) or issubclass(getattr(mod, "Config", object), RunConfig)


def _exit(code: int, multi: bool) -> int:
    if multi:  # never wait in jax's shutdown barrier for peers that may be stuck waiting for us
        from . import distributed

        distributed.exit_now(code)
    return code


def _command_parser() -> argparse.ArgumentParser:
    """`eggroll COMMAND [NAME]`: the first stage, which picks the module (its flags come later)."""
    parser = argparse.ArgumentParser(prog="eggroll", description="Evolution strategies with low-rank perturbations (EGGROLL) in JAX.")
    _distributed_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, table, helptext in (("train", RECIPES, "run a training recipe"),
                                     ("bench", BENCHES, "run a benchmark (last line of output is JSON)")):
        group = sub.add_parser(command, help=helptext).add_subparsers(dest="name", required=True)
        for name, (_, desc) in table.items():
            group.add_parser(name, help=desc, add_help=False)
    for name, (_, desc) in TOOLS.items():
        sub.add_parser(name, help=desc, add_help=False)
    sub.add_parser("list", help="list recipes, benchmarks and tools")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the distributed flags may appear anywhere; take them out before the per-module parsing
    dist_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _distributed_flags(dist_parser)
    dist, argv = dist_parser.parse_known_args(argv)
    args, _ = _command_parser().parse_known_args(argv)
    if args.command == "list":
        print(json.dumps({"recipes": sorted(RECIPES), "benches": sorted(BENCHES), "tools": sorted(TOOLS)}))
        return 0
    # second stage: the chosen module's own flags (its Config fields), parsed strictly
    if args.command in TOOLS:
        args.name, modname, label = args.command, TOOLS[args.command][0], args.command
        rest = argv[argv.index(args.command) + 1:]
    else:
        modname = (RECIPES if args.command == "train" else BENCHES)[args.name][0]
        label = f"{args.command} {args.name}"
        rest = argv[argv.index(args.name) + 1:]
    from . import distributed

    try:
        launch = distributed.resolve(dist.coordinator, dist.num_processes, dist.process_id)
        peer_timeout = dist.peer_timeout or float(os.environ.get("EGGROLL_PEER_TIMEOUT") or distributed.DEFAULT_PEER_TIMEOUT)
    except ValueError as e:
        print(f"eggroll: error: {e}", file=sys.stderr)
        return 2
    multi = launch.num_processes > 1
    mod = importlib.import_module(modname)  # no module touches a device at import
    if multi and not _multi_process_ready(mod):
        print(f"eggroll {label}: error: this command does not support multi-process runs (every "
              "`eggroll train` recipe does); run it as one process, without --coordinator / "
              "--num-processes / --process-id (docs/DISTRIBUTED.md, 'The contract for a recipe')", file=sys.stderr)
        return 2
    if multi and "-h" not in rest and "--help" not in rest:
        distributed.initialize(launch, peer_timeout=peer_timeout)  # before anything touches a device
    own = argparse.ArgumentParser(prog=f"eggroll {label}",
                                  description=(mod.__doc__ or "").strip().splitlines()[0])
    add_dataclass_flags(own, mod.Config)
    cfg = parse_config(own, mod.Config, rest, getattr(mod, "PRESETS", None))
    try:
        with distributed.exit_on_peer_failure(f"eggroll {label}"):
            try:
                result = mod.run(cfg)
            except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
                # bad flags / config: one clear line, not a traceback
                print(f"eggroll {label}: error: {e}", file=sys.stderr)
                return _exit(2, multi)
    except KeyboardInterrupt:
        print(f"eggroll {label}: interrupted (resume with --resume where supported)", file=sys.stderr)
        return _exit(130, multi)
    distributed.finish()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
