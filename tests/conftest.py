"""Test set-up: force 4 CPU devices (before jax is imported) so sharding paths are exercised."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def key():
    return jax.random.PRNGKey(0)


def jaxpr_eqns(closed_jaxpr):
    """Every equation of a traced program, sub-jaxprs (scan, map, shard_map) included."""
    def walk(jp):
        for eqn in jp.eqns:
            yield eqn
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr"):
                        yield from walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        yield from walk(sub)

    return walk(closed_jaxpr.jaxpr)


def jaxpr_shapes(closed_jaxpr) -> set:
    """Shapes of every intermediate of a traced program, sub-jaxprs (scan, map, shard_map) included."""
    return {tuple(getattr(v.aval, "shape", ())) for eqn in jaxpr_eqns(closed_jaxpr) for v in eqn.outvars}
