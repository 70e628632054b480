"""One process of a tiny multi-process EGGROLL run, for tests/test_distributed.py.

    python tests/dist_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0 \\
        --generations 3 --out DIR

An MLP (4 -> 8 -> 1) fits a fixed regression target; population 16 over every device of every
process; the state is replicated on the population mesh; each generation blocks once (CPU
collectives must not run ahead under async dispatch). Each process writes DIR/params_<id>.npz
DIR/host_<id>.npy (a host-side fitness gathered with distributed.host_fitness) and
DIR/members_<id>.npy (the members this process scored on host); DIR/progress
holds the last finished generation (process 0). `train(generations)` runs the same loop
in-process (the single-process reference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

POPULATION = 16


def host_member_fitness(members: np.ndarray) -> np.ndarray:
    """A plain-Python 'simulator': any function of the member index will do for the test."""
    return np.asarray([np.sin(0.37 * m) + 0.01 * m * m for m in members.tolist()], np.float32)


def train(generations: int, sleep: float = 0.0, progress: Path | None = None):
    import jax
    import jax.numpy as jnp
    import optax

    from eggroll import distributed, eggroll as make_es, evaluate_population
    from eggroll.models.mlp import init_mlp, mlp

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    y = jnp.sin(x.sum(-1, keepdims=True))
    es = make_es(POPULATION, sigma=0.1, rank=1)
    opt = optax.adam(0.05)

    @jax.jit
    def generation(params, state, opt_state, ctx):
        def fitness(member):
            return -jnp.mean((mlp(params, x, es.noise(ctx, state, member)) - y) ** 2)

        f = evaluate_population(fitness, es.population)
        grad, state, metrics = es.tell(ctx, state, f)
        updates, opt_state = opt.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, metrics

    params = init_mlp(key, (4, 8, 1))
    ctx = distributed.replicate(es.setup(key, params))
    state, opt_state = es.init(ctx), opt.init(params)
    params, state, opt_state = distributed.replicate((params, state, opt_state))
    for g in range(generations):
        params, state, opt_state, metrics = generation(params, state, opt_state, ctx)
        jax.device_get(metrics)  # one sync per generation
        if progress is not None and distributed.is_main_process():
            progress.write_text(str(g + 1))
        time.sleep(sleep)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(params))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--peer-timeout", type=float, default=30.0)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from eggroll import distributed

    launch = distributed.initialize(distributed.resolve(a.coordinator, a.num_processes, a.process_id),
                                    peer_timeout=a.peer_timeout)
    out = Path(a.out)
    with distributed.exit_on_peer_failure("dist_worker"):
        params = train(a.generations, a.sleep, out / "progress")
        leaves = {f"l{i}": v for i, v in enumerate(_leaves(params))}
        np.savez(out / f"params_{launch.process_id}.npz", **leaves)
        seen = []

        def score(members):  # record which members this process evaluated
            seen.extend(members.tolist())
            return host_member_fitness(members)

        np.save(out / f"host_{launch.process_id}.npy", distributed.host_fitness(score, POPULATION))
        np.save(out / f"members_{launch.process_id}.npy", np.asarray(seen))
        (out / f"checks_{launch.process_id}.txt").write_text("\n".join(_failure_checks(params, out, launch.process_id)))
        distributed.barrier("done")
    distributed.finish()
    return 0


def _failure_checks(params, out: Path, pid: int) -> list[str]:
    """The cross-process safety checks must catch what they are for: replicas that differ, and
    a checkpoint that only some processes can see. Returns one line per check."""
    from eggroll import distributed

    lines = []
    distributed.check_replicas_agree(params)  # the real replicas agree: no error
    lines.append("agree: ok")
    try:
        distributed.check_replicas_agree(np.float32(pid))  # differs between processes
        lines.append("differ: not caught")
    except RuntimeError as e:
        lines.append(f"differ: {e}")
    local = out / f"ckpt_only_on_{pid}"
    if pid == 0:  # a checkpoint that process 0 sees and the others do not
        local.mkdir(exist_ok=True)
        (local / "arrays.safetensors").write_bytes(b"")
    try:
        distributed.checkpoint_exists(local)
        lines.append("missing: not caught")
    except FileNotFoundError as e:
        lines.append(f"missing: {e}")
    return lines


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


if __name__ == "__main__":
    sys.exit(main())
