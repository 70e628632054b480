"""Communication accounting: the bytes a compiled XLA program sends through cross-device collectives.

`collective_bytes` parses the HLO text of a compiled program (`jitted.lower(...).compile()
.as_text()`) and sums, per collective kind, what each device contributes; `communication` turns
that into per-device / per-process traffic of one generation, beside the bf16 gradient a
data-parallel SGD step would all-reduce.
"""

from __future__ import annotations

import re

import numpy as np

from .launch import process_index

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"replica_groups=\[\d+,(\d+)\]", line)  # iota form [groups,size]<=[...]
    return int(m.group(1)) if m else 1


def collective_bytes(hlo_text: str) -> dict:
    """Bytes each device puts into cross-device collectives in one run of a compiled XLA
    program (`jitted.lower(...).compile().as_text()`), by collective kind. From each op's result
    shape: an all-gather over g devices takes result/g from each; a reduce-scatter result*g; an
    all-reduce, all-to-all or permute its result's size. Async '-start' ops count once, by the
    outputs half of their tuple."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        op, result = m.group(2), m.group(1)
        shapes = _SHAPE.findall(result)
        if m.group(3):  # (operands..., outputs...)
            shapes = shapes[len(shapes) // 2:]
        size = sum(_DTYPE_BYTES.get(t, 0) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   for t, dims in shapes)
        g = _group_size(line)
        if op == "all-gather":
            size //= max(g, 1)
        elif op == "reduce-scatter":
            size *= g
        out[op] = out.get(op, 0) + size
    return out


def communication(jitted, *args, n_params: int | None = None, mesh=None) -> dict:
    """Per-generation traffic of a jitted generation function, from its compiled program.

    bytes_per_device: what one device contributes to collectives (its members' fitness etc.);
    bytes_per_process: that times the devices of one process (what leaves the process);
    bytes_ring_per_process: what a ring all-gather makes each process send, (P-1)/P of the
    gathered total, i.e. ~N x bytes per member; sgd_bf16_bytes: 2 bytes x n_params, the gradient
    a data-parallel SGD step all-reduces (a ring all-reduce sends about twice that)."""
    from ..population import population_mesh

    mesh = population_mesh() if mesh is None else mesh
    per_dev = collective_bytes(jitted.lower(*args).compile().as_text())
    dev = sum(per_dev.values())
    n_dev = mesh.size
    local = sum(1 for d in mesh.devices.reshape(-1) if d.process_index == process_index())
    procs = len({d.process_index for d in mesh.devices.reshape(-1)})
    out = {"comm_bytes_per_device": dev, "comm_bytes_per_process": dev * local,
           "comm_bytes_sent_per_process": (dev * n_dev) * (procs - 1) // max(procs, 1),
           "comm_by_kind": per_dev}
    if n_params is not None:
        out["sgd_bf16_bytes"] = 2 * int(n_params)
    return out
