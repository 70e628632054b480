"""Checkpoints: any pytree of arrays -> one directory with `arrays.safetensors` + `meta.json`.

Format. No pickle. `arrays.safetensors` holds one tensor per array leaf, named by its pytree path
(`jax.tree_util.keystr`); dtypes safetensors cannot store (e.g. bfloat16) are stored as raw
unsigned-int bits. `meta.json` is `{"metadata": <the caller's JSON-able dict>, "dtypes": {name:
dtype}}`. Restoring needs a template pytree of the same structure (e.g. freshly initialised
params / optimizer / ES state); None leaves and registered pytree nodes round-trip.

Guarantees. A save is written into a temp dir (files fsynced), then swapped in by rename: the old
checkpoint is renamed to `<name>.old`, the new one to `<name>`, then `.old` is removed. A run
killed at any point leaves either the previous or the new checkpoint readable: if it dies between
the two renames, `<name>` is missing and the readers here fall back to the complete `<name>.old`.
Every read problem (missing / truncated / corrupted file, meta.json that is not JSON, a
checkpoint written for a different model or optimizer) raises `CheckpointError`, a ValueError
with one line that names the file and says what to do; never a raw library error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

ARRAYS, META = "arrays.safetensors", "meta.json"
_NATIVE = {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "bool"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line naming the file and the fix."""


def _fix(directory: Path) -> str:
    return f"delete {directory} or start a new --run-dir, or restore it from a backup"


def _broken(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {path} {what}; {_fix(path.parent)}")


def _short(e: BaseException, n: int = 120) -> str:
    s = " ".join(str(e).split()) or type(e).__name__  # one line
    return s if len(s) <= n else s[:n] + "..."


def _few(names, n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _locate(directory) -> Path:
    """`directory`, or `<directory>.old` when a save died between its two renames."""
    d = Path(directory)
    old = d.with_name(d.name + ".old")
    if not d.exists() and all((old / f).is_file() for f in (ARRAYS, META)):
        return old
    return d


def checkpoint_exists(directory) -> bool:
    """Whether `directory` (or its `.old` fallback) holds a checkpoint, even a broken one: loading
    a broken one raises CheckpointError rather than letting a resume silently start over."""
    d = _locate(directory)
    return any((d / f).exists() for f in (ARRAYS, META))


def _dir(directory) -> Path:
    d = _locate(directory)
    if not d.is_dir():
        raise CheckpointError(f"no checkpoint directory at {Path(directory)} (expected one holding "
                              f"{ARRAYS} and {META}); check the path")
    return d


def _read_meta(d: Path) -> dict:
    path = d / META
    if not path.is_file():
        raise _broken(path, "is missing (the checkpoint is incomplete)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _broken(path, f"is not valid JSON, so it is truncated or corrupted ({_short(e)})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("metadata"), dict)
            and isinstance(meta.get("dtypes"), dict)):
        raise _broken(path, 'is not an eggroll checkpoint meta (expected an object with "metadata" and "dtypes")')
    return meta


def read_metadata(directory) -> dict:
    """The `metadata` dict saved with the checkpoint in `directory` (CheckpointError if unreadable)."""
    return _read_meta(_dir(directory))["metadata"]


def _named_leaves(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(p), x) for p, x in flat]


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems / platforms cannot fsync (a directory)
        pass


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
    meta = json.dumps({"metadata": metadata or {}, "dtypes": dtypes}, indent=1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    old = directory.with_name(directory.name + ".old")
    try:
        save_file(tensors, str(tmp / ARRAYS))
        (tmp / META).write_text(meta)
        for p in (tmp / ARRAYS, tmp / META, tmp):
            _fsync(p)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)  # stale: `directory` is the newer one
            os.replace(directory, old)
        # from here until the next rename only `old` exists; the readers fall back to it
        os.replace(tmp, directory)
        _fsync(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _restore_leaf(d: Path, name: str, arr: np.ndarray, dtype) -> np.ndarray:
    """The stored tensor `arr` viewed as the dtype recorded in meta.json."""
    try:
        want = np.dtype(jnp.dtype(dtype))
    except TypeError:
        want = None
    if want is None or want.itemsize != arr.dtype.itemsize:
        raise _broken(d / META, f"records dtype {dtype!r} for tensor {name}, which cannot be read "
                                f"from its stored {arr.dtype} data (corrupted)")
    return arr if want == arr.dtype else arr.view(want)


def load_checkpoint(directory, template):
    """-> (tree shaped like `template`, metadata). CheckpointError names every mismatched tensor."""
    d = _dir(directory)
    meta = _read_meta(d)
    path = d / ARRAYS
    if not path.is_file():
        raise _broken(path, "is missing (the checkpoint is incomplete)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _broken(path, f"is truncated or corrupted ({_short(e)})") from None
    named = _named_leaves(template)
    want = {n for n, _ in named}
    missing, extra = sorted(want - tensors.keys()), sorted(tensors.keys() - want)
    problems = [f"missing {_few(missing)}"] if missing else []
    problems += [f"unexpected {_few(extra)}"] if extra else []
    leaves, wrong = [], []
    for name, x in named:
        if name not in tensors:
            continue
        dtype = meta["dtypes"].get(name, str(tensors[name].dtype))
        arr = _restore_leaf(d, name, tensors[name], dtype)
        if arr.shape != tuple(np.shape(x)) or arr.dtype != jnp.result_type(x):
            wrong.append(f"{name} is {arr.dtype}{list(arr.shape)}, expected {jnp.result_type(x)}{list(np.shape(x))}")
        leaves.append(jnp.asarray(arr))
    problems += [_few(wrong, 3)] if wrong else []
    if problems:
        raise CheckpointError(f"checkpoint {path} was written by a different model or optimizer "
                              f"({'; '.join(problems)}); resume with the original config, or {_fix(d)}")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves), meta["metadata"]
