"""Checkpoints: any pytree of arrays -> one directory with `arrays.safetensors` + `meta.json`.

No pickle. Leaves are named by their pytree path; restoring needs a template pytree of the same
structure (e.g. freshly initialised params / optimizer / ES state), and any missing, extra or
mis-shaped tensor is reported by name. The ES noise table is not saved: it is a deterministic
function of the key and is taken from the template. Writes are atomic (temp dir + rename), so a
run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from .strategy import ESState

_NATIVE = {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "bool"}


def _strip_tables(tree):
    return jax.tree_util.tree_map(lambda s: s.replace(table=None) if isinstance(s, ESState) else s,
                                  tree, is_leaf=lambda s: isinstance(s, ESState))


def _named_leaves(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(_strip_tables(tree))
    return [(jax.tree_util.keystr(p), x) for p, x in flat]


def save_checkpoint(directory, tree, metadata: dict | None = None) -> Path:
    """Save `tree` (arrays, NamedTuples, dicts, ESState...) and JSON-able `metadata` atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors, dtypes = {}, {}
    for name, x in _named_leaves(tree):
        arr = np.asarray(jax.device_get(x))
        dtypes[name] = str(arr.dtype)
        if str(arr.dtype) not in _NATIVE:  # e.g. bfloat16: store the raw bits
            arr = arr.view(f"uint{arr.dtype.itemsize * 8}")
        tensors[name] = np.array(arr, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / "arrays.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"metadata": metadata or {}, "dtypes": dtypes}, indent=1))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory, template):
    """-> (tree shaped like `template`, metadata). Raises naming every mismatched tensor."""
    directory = Path(directory)
    if not (directory / "arrays.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {directory} (expected arrays.safetensors and meta.json)")
    meta = json.loads((directory / "meta.json").read_text())
    tensors = load_file(str(directory / "arrays.safetensors"))
    named = _named_leaves(template)
    want = {n for n, _ in named}
    missing, extra = sorted(want - tensors.keys()), sorted(tensors.keys() - want)
    problems = [f"missing: {missing}"] if missing else []
    problems += [f"unexpected: {extra}"] if extra else []
    leaves = []
    for name, x in named:
        if name not in tensors:
            continue
        arr = tensors[name]
        dtype = meta["dtypes"].get(name, str(arr.dtype))
        if dtype != str(arr.dtype):
            arr = arr.view(jnp.dtype(dtype))
        if arr.shape != tuple(np.shape(x)) or jnp.dtype(dtype) != jnp.result_type(x):
            problems.append(f"{name}: checkpoint {dtype}{list(arr.shape)} vs expected "
                            f"{jnp.result_type(x)}{list(np.shape(x))}")
        leaves.append(jnp.asarray(arr))
    if problems:
        raise ValueError(f"checkpoint {directory} does not match the model/optimizer: " + "; ".join(problems))
    stripped = _strip_tables(template)
    restored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(stripped), leaves)
    # put the (deterministic) noise tables back from the template
    tables = [s.table for s in jax.tree_util.tree_leaves(template, is_leaf=lambda s: isinstance(s, ESState))
              if isinstance(s, ESState)]
    it = iter(tables)
    restored = jax.tree_util.tree_map(lambda s: s.replace(table=next(it)) if isinstance(s, ESState) else s,
                                      restored, is_leaf=lambda s: isinstance(s, ESState))
    return restored, meta["metadata"]


def config_mismatch(config, saved: dict, fields) -> list[str]:
    """The trajectory-changing `fields` on which a dataclass `config` differs from the config
    dict saved with a checkpoint, as "name: checkpoint X vs now Y" lines (empty: safe to resume)."""
    now = dataclasses.asdict(config)
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in fields if saved.get(k) != now[k]]
