"""Communication accounting: the bytes a compiled XLA program sends through cross-device collectives.

`collective_bytes` parses the HLO text of a compiled program (`jitted.lower(...).compile()
.as_text()`) and sums, per collective kind, what each device contributes, each op once;
`loop_collective_bytes` counts every op as often as it runs (an op in a while body x the loop's
trip count); `communication` turns the latter into per-device / per-process traffic of one
generation, beside the bf16 gradient a data-parallel SGD step would all-reduce.
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


_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_HEADER = re.compile(r"(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation|branch_computations|"
                    r"called_computations)=(\{[^}]*\}|%[\w.\-]+)")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name ("ENTRY" for the entry) -> its instruction lines."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m:
            name = "ENTRY" if line.startswith("ENTRY") else m.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    return comps


def loop_collective_bytes(hlo_text: str) -> dict:
    """`collective_bytes` with every collective counted as often as it runs in one run of the
    program, walking the calls from the entry computation: a while body counts `known_trip_count`
    times (its condition one more; nested loops multiply; an unknown count counts once), a
    conditional its most expensive branch, any other called computation once. A PPO update's
    per-minibatch gradient thus counts epochs x minibatches times. Text without computation
    headers (an HLO fragment) is counted op by op, as `collective_bytes` does."""
    comps = _computations(hlo_text)
    if "ENTRY" not in comps:
        return collective_bytes(hlo_text)
    memo: dict[str, dict] = {}

    def add(out: dict, part: dict, times: int) -> None:
        for k, v in part.items():
            out[k] = out.get(k, 0) + times * v

    def total(comp: str, seen: tuple = ()) -> dict:
        if comp in memo:
            return memo[comp]
        lines = comps.get(comp, [])
        out = dict(collective_bytes("\n".join(lines)))
        for line in lines:
            trips = _TRIPS.search(line)
            n = int(trips.group(1)) if trips and " while(" in line else 1
            for attr, ref in _CALLS.findall(line):
                callees = [c for c in re.findall(r"%([\w.\-]+)", ref) if c in comps and c not in seen]
                parts = [total(c, (*seen, comp)) for c in callees]
                if attr in ("true_computation", "false_computation", "branch_computations"):
                    parts = [max(parts, key=lambda d: sum(d.values()))] if parts else []  # one branch runs
                for part in parts:
                    add(out, part, n + 1 if attr == "condition" else n)
        memo[comp] = out
        return out

    return total("ENTRY")


def hlo_communication(hlo_text: str, *, n_params: int | None = None, mesh=None) -> dict:
    """`communication` of a compiled program given as its HLO text."""
    from ..population import population_mesh

    mesh = population_mesh() if mesh is None else mesh
    per_dev = loop_collective_bytes(hlo_text)
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


def communication(jitted, *args, n_params: int | None = None, mesh=None) -> dict:
    """Per-generation traffic of a jitted generation function, from its compiled program, every
    collective counted as often as it runs (`loop_collective_bytes`).

    comm_bytes_per_device: what one device contributes to collectives (its members' fitness
    etc.); comm_bytes_per_process: that times the devices of one process (what leaves the
    process); comm_bytes_sent_per_process: what a ring all-gather makes each process send, (P-1)/P
    of the gathered total, i.e. ~N x bytes per member; comm_by_kind: comm_bytes_per_device by
    collective kind; sgd_bf16_bytes: 2 bytes x n_params, the gradient a data-parallel SGD step
    all-reduces (a ring all-reduce sends about twice that)."""
    return hlo_communication(jitted.lower(*args).compile().as_text(), n_params=n_params, mesh=mesh)
