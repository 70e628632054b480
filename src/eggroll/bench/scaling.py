"""Multi-device / multi-process scaling: bytes a generation sends, and population-step speed-up.

    eggroll bench scaling                         # devices 1,2,4 (simulated CPU devices) + 2 processes
    eggroll bench scaling --devices 1,2 --processes 0

Each configuration runs in a fresh child process (the CPU device count is fixed when jax starts):
`--xla_force_host_platform_device_count=d` for d in `devices`, and, if `processes` > 1, that
many real processes joined by jax.distributed on 127.0.0.1 (gloo collectives), one device each.

Workload: an MLP of `layers` square `width` x `width` layers, `population` members, each member
scoring `batch` inputs (fitness = -mean squared output error); one generation = population
forward + es.tell + an optax step, jitted, the state replicated on the population mesh.

Reported per configuration and model size (small: `width_small`, large: `width`):
  comm_bytes_per_process   bytes the process's devices put into the generation's collectives,
                           read from the compiled program (distributed.communication): the
                           all-gathered fitness. It must be O(N) and the same at both sizes.
  comm_bytes_sent_per_process  what an all-gather across P processes makes each one send,
                           (P-1)/P of the gathered total.
  sgd_bf16_bytes           2 bytes x parameters: the gradient data-parallel SGD all-reduces.
  gen_ms                   median wall time of one generation (large model), after warm-up.
Scaling (large model, fixed population): speedup_d = gen_ms(1 device) / gen_ms(d devices) and
efficiency_d = speedup_d / d. The simulated devices share this machine's cores (os.cpu_count()
is reported), so efficiency beyond the core count says nothing about real hardware.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time


@dataclasses.dataclass
class Config:
    width: int = dataclasses.field(default=512, metadata={"help": "layer width of the large model"})
    width_small: int = dataclasses.field(default=32, metadata={"help": "layer width of the small model"})
    layers: int = dataclasses.field(default=2, metadata={"help": "square layers"})
    population: int = dataclasses.field(default=256, metadata={"help": "population N (a multiple of every device count)"})
    batch: int = dataclasses.field(default=8, metadata={"help": "inputs scored per member"})
    devices: str = dataclasses.field(default="1,2,4", metadata={"help": "simulated CPU device counts, comma separated"})
    processes: int = dataclasses.field(default=2, metadata={"help": "also run this many real processes (0: skip)"})
    reps: int = dataclasses.field(default=7, metadata={"help": "timed generations per configuration"})
    timeout: int = dataclasses.field(default=300, metadata={"help": "seconds allowed per child process"})


def _measure(cfg: dict) -> dict:
    """In a child: comm bytes at both sizes and the large model's generation time."""
    import jax
    import jax.numpy as jnp
    import optax

    from .. import distributed
    from ..models.mlp import init_mlp, mlp
    from ..population import evaluate_population
    from ..strategy import eggroll

    out = {"devices": jax.device_count(), "processes": jax.process_count()}
    for tag, width in (("small", cfg["width_small"]), ("large", cfg["width"])):
        key = jax.random.PRNGKey(0)
        sizes = (width,) * (cfg["layers"] + 1)
        x = jax.random.normal(key, (cfg["batch"], width))
        y = jnp.zeros((cfg["batch"], width))
        es = eggroll(cfg["population"], sigma=0.01, rank=1)
        opt = optax.sgd(1e-3)

        def generation(params, state, opt_state, ctx, es=es, opt=opt, x=x, y=y):
            def fitness(m):
                return -jnp.mean((mlp(params, x, es.noise(ctx, state, m)) - y) ** 2)

            f = evaluate_population(fitness, es.population)
            grad, state, _ = es.tell(ctx, state, f)
            updates, opt_state = opt.update(grad, opt_state, params)
            return optax.apply_updates(params, updates), state, opt_state, f.mean()

        params = init_mlp(key, sizes)
        ctx = distributed.replicate(es.setup(key, params))
        carry = distributed.replicate((params, es.init(ctx), opt.init(params)))
        n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
        gen = jax.jit(generation)
        comm = distributed.communication(gen, *carry, ctx, n_params=n_params)
        out[tag] = {"width": width, "num_params": int(n_params), **comm}
        if tag == "large":
            times = []
            for i in range(cfg["reps"] + 2):
                t0 = time.perf_counter()
                *carry, m = gen(*carry, ctx)
                jax.block_until_ready(m)  # one sync per generation (CPU collectives)
                if i >= 2:  # compile + one warm-up call
                    times.append(time.perf_counter() - t0)
            out["gen_ms"] = 1000 * statistics.median(times)
            out["gen_ms_min"] = 1000 * min(times)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EGGROLL_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return env


def _child(cfg: Config, devices: int, processes: int = 1) -> dict:
    payload = json.dumps(dataclasses.asdict(cfg))
    base = [sys.executable, "-m", "eggroll.bench.scaling", "--child", payload]
    if processes <= 1:
        r = subprocess.run(base, env=_env(devices), capture_output=True, text=True, timeout=cfg.timeout, check=False)
        if r.returncode:
            raise RuntimeError(f"scaling child ({devices} devices) failed:\n{r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])
    port = _free_port()
    procs = [subprocess.Popen([*base, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                               "--process-id", str(i)], env=_env(devices), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=cfg.timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"scaling child ({processes} processes) failed:\n{err[-2000:]}")
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    first = results[0]
    first["per_process_bytes"] = [r["large"]["comm_bytes_per_process"] for r in results]
    return first


def run(cfg: Config) -> dict:
    counts = [int(d) for d in str(cfg.devices).split(",") if d.strip()]
    if not counts or any(d < 1 for d in counts):
        raise ValueError(f"devices must be positive integers, comma separated; got {cfg.devices!r}")
    for d in counts + ([cfg.processes] if cfg.processes > 1 else []):
        if cfg.population % d:
            raise ValueError(f"population {cfg.population} must be a multiple of every device / process count ({d})")
    if cfg.processes < 0 or cfg.reps < 1 or cfg.width < 1 or cfg.width_small < 1:
        raise ValueError("processes must be >= 0, reps >= 1 and widths >= 1")
    rows = {f"{d}dev": _child(cfg, d) for d in counts}
    if cfg.processes > 1:
        rows[f"{cfg.processes}proc"] = _child(cfg, 1, cfg.processes)
    base = rows[f"{counts[0]}dev"]["gen_ms"] * counts[0]  # time on one device (extrapolated if 1 is absent)
    scaling = {}
    for name, r in rows.items():
        d = r["devices"]
        speedup = base / r["gen_ms"]
        scaling[name] = {"devices": d, "processes": r["processes"], "gen_ms": round(r["gen_ms"], 3),
                         "speedup": round(speedup, 3), "efficiency": round(speedup / d, 3)}
    comm = {name: {size: {k: r[size][k] for k in ("width", "num_params", "comm_bytes_per_device",
                                                  "comm_bytes_per_process", "comm_bytes_sent_per_process",
                                                  "sgd_bf16_bytes")}
                   for size in ("small", "large")} for name, r in rows.items()}
    independent = all(c["small"]["comm_bytes_per_process"] == c["large"]["comm_bytes_per_process"]
                      for c in comm.values())
    return {"population": cfg.population, "bytes_per_member": 4, "cpu_count": os.cpu_count(),
            "comm": comm, "comm_independent_of_model_size": independent, "scaling": scaling,
            "config": dataclasses.asdict(cfg)}


def _child_main(argv) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    a = p.parse_args(argv)
    from .. import distributed

    distributed.initialize(distributed.resolve(a.coordinator, a.num_processes, a.process_id))
    with distributed.exit_on_peer_failure("bench scaling"):
        out = _measure(json.loads(a.child))
    distributed.finish()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
