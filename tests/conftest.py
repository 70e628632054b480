"""Test set-up: force 4 CPU devices (before jax is imported) so sharding paths are exercised."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def key():
    return jax.random.PRNGKey(0)


def jaxpr_shapes(closed_jaxpr) -> set:
    """Shapes of every intermediate of a traced program, sub-jaxprs (scan, map, shard_map) included."""
    out = set()

    def walk(jp):
        for eqn in jp.eqns:
            out.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return out
