"""Benchmarks. Each module exposes a `Config` dataclass and `run(cfg) -> dict`; the CLI
(`eggroll bench NAME [flags]`) builds its flags from the dataclass fields and prints the dict
as the final JSON line.

    throughput   EGGROLL population forward / ES update / whole generation vs plain batched
                 inference of the same MLP, and vs a full-rank OpenES generation.
"""

BENCHES = {"throughput": "eggroll.bench.throughput"}
