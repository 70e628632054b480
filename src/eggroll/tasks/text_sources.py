"""Where the documents of a byte corpus come from, and which split each goes to (tasks/text.py).

`resolve(dataset, text_column, streaming)` names a `Source`: the standard library's `*.py` files,
local text / JSONL files (a file, a directory or a glob), or a Hugging Face dataset (saved with
`save_to_disk`, or a hub id). Its `docs(is_full)` yields (split index or None, key, document
bytes) lazily, so a cached corpus costs no pass over its source. Splits are by document and
deterministic: `assign_splits` orders the keys by sha256 (`key_fraction`) and sends the first 5%
to valid, the next 5% to test (see the tasks/text.py docstring for the whole rule).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

__all__ = ["ALIASES", "HELD_OUT_FRACTION", "SPLITS", "STDLIB_SKIP_DIRS", "Source", "assign_splits",
           "key_fraction", "resolve"]

SPLITS = ("train", "valid", "test")
HELD_OUT_FRACTION = 0.05  # valid and test each
ALIASES = {"minipile": "JeanKaddour/minipile"}
# directories of the standard library left out of the default corpus
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_HF_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


# ---------------------------------------------------------------------------------------------
# split assignment
# ---------------------------------------------------------------------------------------------

def key_fraction(key: str) -> float:
    """sha256(key) as a number in [0, 1): the position of a document in the split order."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def assign_splits(keys: Iterable[str]) -> list[int]:
    """Split index (0 train, 1 valid, 2 test) of each key: sorted by key_fraction, the first 5%
    (>= 1) are valid, the next 5% (>= 1) test, the rest train. Needs >= 3 keys."""
    keys = list(keys)
    n = len(keys)
    if n < 3:
        raise ValueError(f"a split by document needs at least 3 documents, got {n}")
    n_held = max(1, round(n * HELD_OUT_FRACTION))
    if n - 2 * n_held < 1:
        n_held = (n - 1) // 2
    order = sorted(range(n), key=lambda i: (key_fraction(keys[i]), keys[i]))
    out = [0] * n
    for rank, i in enumerate(order):
        out[i] = 1 if rank < n_held else 2 if rank < 2 * n_held else 0
    return out


def _streamed_split(key: str) -> int:
    u = key_fraction(key)
    return 1 if u < HELD_OUT_FRACTION else 2 if u < 2 * HELD_OUT_FRACTION else 0


# ---------------------------------------------------------------------------------------------
# sources: each yields (split or None, key, document bytes)
# ---------------------------------------------------------------------------------------------

class Source(NamedTuple):
    kind: str  # "stdlib" | "files" | "hf"
    name: str  # for the cache directory
    fingerprint: dict  # everything that changes the converted bytes
    # docs(is_full) -> (split index or None, key, bytes); split None: too few documents, split by
    # bytes. is_full(split index) says a split has reached its cap (a source may skip the rest).
    docs: Callable[[Callable[[int], bool]], Iterator[tuple[int | None, str, bytes]]]


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP_DIRS)
    return root, files


def _file_docs(root: Path, files: list[Path], text_column: str):
    """Document reader for plain text and JSONL files (one document per JSONL line). Nothing is
    read until the conversion runs, so a cached corpus costs no pass over its source."""
    def docs(is_full=lambda s: False):
        keys: list[tuple[str, Path, int | None]] = []
        for p in files:
            rel = p.relative_to(root).as_posix()
            if p.suffix == ".jsonl":
                n_lines = sum(1 for ln in p.read_bytes().splitlines() if ln.strip())
                keys += [(f"{rel}#{i}", p, i) for i in range(n_lines)]
            else:
                keys.append((rel, p, None))
        lines_of: dict = {}
        split = assign_splits([k for k, _, _ in keys]) if len(keys) >= 3 else [None] * len(keys)
        for s, (key, p, line) in zip(split, keys):
            if line is None:
                yield s, key, p.read_bytes()
                continue
            if p not in lines_of:
                lines_of.clear()
                lines_of[p] = [ln for ln in p.read_bytes().splitlines() if ln.strip()]
            try:
                rec = json.loads(lines_of[p][line])
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {line + 1} is not valid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_column), str):
                raise TypeError(f"{p}: line {line + 1} has no string field {text_column!r} "
                                 f"(set text_column to the field holding the text)")
            yield s, key, rec[text_column].encode("utf-8")
    return docs


def _local_files(spec: str) -> tuple[Path, list[Path]]:
    """A file, a directory (all non-hidden files below it) or a glob -> (root, sorted files)."""
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"dataset glob {spec!r} matches no files")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        return root, files
    path = Path(spec)
    if path.is_file():
        return path.parent, [path]
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"dataset directory {spec!r} contains no files (empty corpus)")
    return path, files


def _files_fingerprint(root: Path, files: list[Path]) -> list:
    return [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _import_datasets():
    try:
        import datasets
    except ModuleNotFoundError:
        raise ModuleNotFoundError("Hugging Face datasets need the `datasets` package: "
                                  "pip install 'eggroll-jax[text]' (or pip install datasets)") from None
    return datasets


def _hf_source(spec: str, text_column: str, streaming: bool) -> Source:
    """A dataset saved with save_to_disk (a directory) or a hub id `owner/name[:config]`."""
    local = Path(spec)
    name, config = (spec, None) if local.exists() else (spec.split(":", 1) + [None])[:2]
    fingerprint = {"hf": name, "config": config, "text_column": text_column}
    if local.exists():
        fingerprint["files"] = _files_fingerprint(local, sorted(p for p in local.rglob("*") if p.is_file()))

    def docs(is_full=lambda s: False):
        datasets = _import_datasets()
        if local.exists():
            ds = datasets.load_from_disk(str(local))
        else:
            try:
                ds = datasets.load_dataset(name, config, streaming=streaming)
            except (FileNotFoundError, ConnectionError) as e:  # unknown id, or offline without a cached copy
                raise FileNotFoundError(f"cannot load Hugging Face dataset {name!r} ({type(e).__name__}: {e}); "
                                        "check the id and the network, or give a local path") from None
        parts = ds if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)) else {"train": ds}
        named = {s: next((parts[n] for n in _HF_SPLIT_NAMES[s] if n in parts), None) for s in SPLITS}
        if named["train"] is None:
            raise ValueError(f"dataset {spec!r} has no train split (splits: {sorted(parts)})")
        for s, part in named.items():
            if part is None:
                continue
            cols = getattr(part, "column_names", None)
            if cols is not None and text_column not in cols:
                raise ValueError(f"dataset {spec!r} has no column {text_column!r} (columns: {cols}); "
                                 "set text_column")
        own = named["valid"] is not None and named["test"] is not None
        for i_split, s in enumerate(SPLITS):
            part = named[s]
            if part is None or (not own and s != "train"):
                continue
            if own:
                assign = None
            elif hasattr(part, "__len__"):
                assign = assign_splits(f"row{i}" for i in range(len(part))) if len(part) >= 3 else None
            else:
                assign = "streamed"
            for i, row in enumerate(part):
                if own and is_full(i_split):
                    break  # a streamed split stops downloading once its cap is reached
                text = row[text_column]
                if not isinstance(text, str):
                    raise TypeError(f"dataset {spec!r}: column {text_column!r} row {i} is not a string")
                which = (i_split if own else _streamed_split(f"row{i}") if assign == "streamed"
                         else None if assign is None else assign[i])
                yield which, f"row{i}", text.encode("utf-8")
    return Source("hf", name, fingerprint, docs)


def resolve(dataset: str, text_column: str, streaming: bool) -> Source:
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty string, got {dataset!r}")
    if dataset == "stdlib":
        root, files = _stdlib_files()
        fingerprint = {"stdlib": str(root), "python": sys.version, "files": len(files),
                       "bytes": sum(p.stat().st_size for p in files)}
        docs = _file_docs(root, files, text_column)
        return Source("stdlib", "stdlib", fingerprint, docs)
    if dataset.startswith("hf:"):
        return _hf_source(dataset[3:], text_column, streaming)
    if dataset in ALIASES:
        return _hf_source(ALIASES[dataset], text_column, streaming)
    path = Path(dataset).expanduser()
    if _is_saved_hf_dataset(path):
        return _hf_source(str(path), text_column, streaming)
    if path.exists() or any(c in dataset for c in "*?["):
        root, files = _local_files(str(path))
        docs = _file_docs(root, files, text_column)
        return Source("files", path.name or "files",
                       {"files_root": str(root.resolve()), "files": _files_fingerprint(root, files),
                        "text_column": text_column}, docs)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", dataset):
        return _hf_source(dataset, text_column, streaming)
    raise ValueError(f"unknown dataset {dataset!r}: not 'stdlib', not an existing file, directory or glob, "
                     f"not an alias ({', '.join(sorted(ALIASES))}) and not a Hugging Face id 'owner/name' "
                     "(use 'hf:NAME' for a hub dataset without an owner)")

