"""Byte-level text corpora for language models: load, split, cache, n-gram baselines, streams.

    splits = load_corpus()                      # Python's standard library source, offline
    splits = load_corpus("notes/*.md")          # local text files (a file, a directory or a glob)
    splits = load_corpus("data.jsonl")          # one document per line: {"text": ...}
    splits = load_corpus("minipile")            # Hugging Face datasets (extra: pip install '.[text]')
    ngram_bits_per_byte(splits)                 # unigram / bigram bits per byte, fit on train
    eggroll corpus --dataset stdlib             # CLI: convert, print sizes and n-gram bits/byte

A corpus is three 1-D uint8 arrays (ByteSplits: train, valid, test). Each document's raw bytes
(UTF-8 for text) are followed by one 0 byte, the document separator; 0 bytes inside a document
are dropped, so 0 occurs only as a separator. The first conversion writes
`<cache>/<name>-<fingerprint>/{train,valid,test}.u8` plus `manifest.json`; later calls memory-map
those files. The cache is `cache_dir`, else `$EGGROLL_CACHE/text`, else `~/.cache/eggroll/text`.
The fingerprint covers the source (file names, sizes and mtimes; the Python version for stdlib;
the dataset id), `max_bytes` and the text column, so a changed source is converted again.

Splits are by document, never inside one, and deterministic: each document has a key (its path
relative to the corpus root, `path#line` for JSONL, `row<i>` for a dataset row) and
u = sha256(key) as a fraction of 2**64. Documents are sorted by u; the first 5% (at least one)
form valid, the next 5% (at least one) test, the rest train. A corpus of fewer than 3 documents
(e.g. one text file) is split by bytes instead: first 90% train, next 5% valid, last 5% test.
A Hugging Face dataset with its own validation/test splits keeps them. A streamed (capped) hub
dataset with only a train split sends a row to valid when u < 0.05 and to test when u < 0.10.

`max_bytes` caps the corpus for quick runs: train keeps at most 90% of it, valid and test at most
5% each (each split is cut at its cap, documents in key order).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["SEPARATOR", "ByteSplits", "default_cache_dir", "load_corpus", "ngram_bits_per_byte",
           "ngram_counts", "prepare_corpus", "read_manifest", "stream_offsets", "stream_windows"]

SEPARATOR = 0
SPLITS = ("train", "valid", "test")
HELD_OUT_FRACTION = 0.05  # valid and test each
ALIASES = {"minipile": "JeanKaddour/minipile"}
FORMAT_VERSION = 1
# directories of the standard library left out of the default corpus
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_HF_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


class ByteSplits(NamedTuple):
    """A byte corpus: 1-D uint8 arrays (np.memmap when read from the cache), 0 after each document."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


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


def _caps(max_bytes: int | None) -> dict[str, float]:
    if max_bytes is None:
        return dict.fromkeys(SPLITS, float("inf"))
    held = max(1, int(max_bytes * HELD_OUT_FRACTION))
    return {"train": max(1, max_bytes - 2 * held), "valid": held, "test": held}


# ---------------------------------------------------------------------------------------------
# sources: each yields (split or None, key, document bytes)
# ---------------------------------------------------------------------------------------------

class _Source(NamedTuple):
    kind: str  # "stdlib" | "files" | "hf"
    name: str  # for the cache directory
    fingerprint: dict  # everything that changes the converted bytes
    # docs(is_full) -> (split index or None, key, bytes); split None: too few documents, split by
    # bytes. is_full(split index) says a split has reached its cap (a source may skip the rest).
    docs: Callable[[Callable[[int], bool]], Iterator[tuple[int | None, str, bytes]]]


def _clean(doc: bytes) -> bytes:
    return doc.replace(b"\x00", b"")


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


def _hf_source(spec: str, text_column: str, streaming: bool) -> _Source:
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
    return _Source("hf", name, fingerprint, docs)


def _resolve(dataset: str, text_column: str, streaming: bool) -> _Source:
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty string, got {dataset!r}")
    if dataset == "stdlib":
        root, files = _stdlib_files()
        fingerprint = {"stdlib": str(root), "python": sys.version, "files": len(files),
                       "bytes": sum(p.stat().st_size for p in files)}
        docs = _file_docs(root, files, text_column)
        return _Source("stdlib", "stdlib", fingerprint, docs)
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
        return _Source("files", path.name or "files",
                       {"files_root": str(root.resolve()), "files": _files_fingerprint(root, files),
                        "text_column": text_column}, docs)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", dataset):
        return _hf_source(dataset, text_column, streaming)
    raise ValueError(f"unknown dataset {dataset!r}: not 'stdlib', not an existing file, directory or glob, "
                     f"not an alias ({', '.join(sorted(ALIASES))}) and not a Hugging Face id 'owner/name' "
                     "(use 'hf:NAME' for a hub dataset without an owner)")


# ---------------------------------------------------------------------------------------------
# conversion and cache
# ---------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    root = os.environ.get("EGGROLL_CACHE")
    return Path(root) / "text" if root else Path.home() / ".cache" / "eggroll" / "text"


def _convert(source: _Source, out: Path, max_bytes: int | None) -> dict:
    """Write the three split files into `out`; returns the manifest."""
    caps = _caps(max_bytes)
    sizes, ndocs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    unassigned = []  # documents of a corpus too small to split by document: split by bytes
    with ExitStack() as stack:
        handles = {s: stack.enter_context(open(out / f"{s}.u8", "wb")) for s in SPLITS}
        for which, _key, doc in source.docs(lambda i: sizes[SPLITS[i]] >= caps[SPLITS[i]]):
            doc = _clean(doc)
            if not doc:
                continue
            if which is None:
                unassigned.append(doc + b"\x00")
                continue
            s = SPLITS[which]
            room = caps[s] - sizes[s]
            if room <= 0:
                if all(sizes[t] >= caps[t] for t in SPLITS):
                    break
                continue
            chunk = (doc + b"\x00")[: int(min(room, len(doc) + 1))]
            handles[s].write(chunk)
            sizes[s] += len(chunk)
            ndocs[s] += 1
        if unassigned:
            blob = b"".join(unassigned)
            n = len(blob) if max_bytes is None else min(len(blob), max_bytes)
            n_held = max(1, int(n * HELD_OUT_FRACTION))
            bounds = {"train": (0, n - 2 * n_held), "valid": (n - 2 * n_held, n - n_held), "test": (n - n_held, n)}
            for s, (a, b) in bounds.items():
                handles[s].write(blob[a:max(a, b)])
                sizes[s], ndocs[s] = max(0, b - a), len(unassigned)
    empty = [s for s in SPLITS if sizes[s] == 0]
    if empty:
        raise ValueError(f"dataset {source.name!r} gives an empty {'/'.join(empty)} split "
                         f"(split sizes {sizes}): the corpus is empty or too small")
    return {"format": FORMAT_VERSION, "kind": source.kind, "name": source.name,
            "split": "bytes" if unassigned else "documents",
            "bytes": sizes, "documents": ndocs, "total_bytes": sum(sizes.values()),
            "max_bytes": max_bytes, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source.fingerprint if source.kind != "files" else
            {k: v for k, v in source.fingerprint.items() if k != "files"} | {"files": len(source.fingerprint["files"])}}


def _fingerprint(source: _Source, max_bytes: int | None) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "kind": source.kind, "source": source.fingerprint,
                       "max_bytes": max_bytes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_corpus(dataset: str = "stdlib", cache_dir=None, *, max_bytes: int | None = None,
                   text_column: str = "text") -> Path:
    """Convert `dataset` once into the cache (see module docstring); returns its directory."""
    if max_bytes is not None and (not isinstance(max_bytes, (int, np.integer)) or max_bytes < 3):
        raise ValueError(f"max_bytes must be None or an integer >= 3, got {max_bytes!r}")
    max_bytes = None if max_bytes is None else int(max_bytes)
    source = _resolve(dataset, text_column, streaming=max_bytes is not None)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    slug = re.sub(r"[^\w.-]+", "_", source.name).strip("_")[-40:] or "corpus"
    final = cache / f"{slug}-{_fingerprint(source, max_bytes)}"
    if (final / "manifest.json").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        manifest = _convert(source, tmp, max_bytes)
        manifest["dataset"] = dataset
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same conversion first
            if not (final / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_manifest(directory) -> dict:
    return json.loads((Path(directory) / "manifest.json").read_text())


def load_corpus(dataset: str = "stdlib", cache_dir=None, *, max_bytes: int | None = None,
                text_column: str = "text") -> ByteSplits:
    """The corpus `dataset` as memory-mapped uint8 arrays (converted into the cache on first use).

    dataset: "stdlib" (default, offline), a text/JSONL file, a directory, a glob, a directory made
    by `datasets.Dataset.save_to_disk`, an alias ("minipile"), a hub id "owner/name[:config]" or
    "hf:NAME". max_bytes: cap on the total size (90/5/5 over the splits). text_column: the field
    holding the text in JSONL files and datasets."""
    directory = prepare_corpus(dataset, cache_dir, max_bytes=max_bytes, text_column=text_column)
    manifest = read_manifest(directory)
    arrays = []
    for s in SPLITS:
        path = directory / f"{s}.u8"
        size = path.stat().st_size if path.exists() else -1
        if size != manifest["bytes"][s]:
            raise ValueError(f"corrupt corpus cache {directory}: {s}.u8 has {size} bytes, manifest says "
                             f"{manifest['bytes'][s]}; delete the directory to convert again")
        arrays.append(np.memmap(path, dtype=np.uint8, mode="r", shape=(size,)))
    return ByteSplits(*arrays)


# ---------------------------------------------------------------------------------------------
# n-gram baselines
# ---------------------------------------------------------------------------------------------

def ngram_counts(data: np.ndarray, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(unigram counts [256], bigram counts [256, 256]) of a byte array, int64.

    bigram[a, b] counts positions t with data[t] = b preceded by a; the first byte's context is
    the separator 0 (a document start), so both tables count every byte once."""
    data = np.asarray(data)
    if data.ndim != 1 or data.dtype != np.uint8:
        raise ValueError(f"expected a 1-D uint8 array, got {data.dtype}{list(data.shape)}")
    uni = np.zeros(256, np.int64)
    bi = np.zeros(256 * 256, np.int64)
    prev = SEPARATOR
    for start in range(0, len(data), chunk):
        x = np.asarray(data[start:start + chunk]).astype(np.int64)
        ctx = np.concatenate([[prev], x[:-1]])
        uni += np.bincount(x, minlength=256)
        bi += np.bincount(ctx * 256 + x, minlength=256 * 256)
        prev = x[-1]
    return uni, bi.reshape(256, 256)


def ngram_bits_per_byte(splits: ByteSplits, k: float = 1.0) -> dict:
    """Unigram and bigram bits per byte, fit on train and evaluated on every split.

    Add-k smoothing (k=1: Laplace): p(b) = (c(b)+k) / (N+256k) and
    p(b|a) = (c(a,b)+k) / (c(a)+256k), where c(a) = sum_b c(a,b). bits/byte on a split =
    -mean over its bytes of log2 p (the first byte's context is the separator 0)."""
    if not k > 0:
        raise ValueError(f"smoothing k must be > 0, got {k}")
    uni, bi = ngram_counts(splits.train)
    log_uni = np.log2((uni + k) / (uni.sum() + 256 * k))
    log_bi = np.log2((bi + k) / (bi.sum(axis=1, keepdims=True) + 256 * k))
    out = {}
    for name in SPLITS:
        data = getattr(splits, name)
        if len(data) == 0:
            continue
        u, b = (uni, bi) if name == "train" else ngram_counts(data)
        out[f"unigram_{name}"] = float(-(u * log_uni).sum() / u.sum())
        out[f"bigram_{name}"] = float(-(b * log_bi).sum() / b.sum())
    return out


# ---------------------------------------------------------------------------------------------
# parallel streams
# ---------------------------------------------------------------------------------------------

def stream_offsets(length: int, n_streams: int) -> np.ndarray:
    """Start offsets of n_streams streams evenly spaced over a corpus of `length` bytes: i*length//n."""
    if length < 1 or n_streams < 1:
        raise ValueError(f"need length >= 1 and n_streams >= 1, got {length}, {n_streams}")
    return (np.arange(n_streams, dtype=np.int64) * length) // n_streams


def stream_windows(data: np.ndarray, n_streams: int, tokens: int, position: int,
                   overlap: int = 0) -> np.ndarray:
    """Window `position` of each of n_streams parallel streams: uint8 [n_streams, tokens + overlap].

    Stream i reads data cyclically from offset i*len//n_streams; window p holds its bytes
    p*tokens ... p*tokens + tokens + overlap - 1 (indices mod len(data)). Consecutive windows
    tile each stream; overlap=1 repeats the next window's first byte at the end, so
    inputs = w[:, :-1], targets = w[:, 1:] predicts every byte of the stream exactly once
    (after the very first)."""
    if tokens < 1 or overlap < 0 or position < 0:
        raise ValueError(f"need tokens >= 1, overlap >= 0, position >= 0; got {tokens}, {overlap}, {position}")
    n = len(data)
    start = (int(position) * int(tokens)) % n
    idx = (stream_offsets(n, n_streams)[:, None] + start + np.arange(tokens + overlap)) % n
    return np.asarray(data[idx.ravel()]).reshape(n_streams, tokens + overlap)


# ---------------------------------------------------------------------------------------------
# `eggroll corpus`: convert a corpus and print its sizes and n-gram baselines
# ---------------------------------------------------------------------------------------------

@dataclass
class Config:
    dataset: str = field(default="stdlib", metadata={"help": "corpus: stdlib, a file/dir/glob, minipile, a HF id"})
    max_bytes: int = field(default=0, metadata={"help": "cap on the corpus size in bytes (0: all of it)"})
    text_column: str = field(default="text", metadata={"help": "text field of JSONL files / datasets"})
    cache_dir: str = field(default="", metadata={"help": "cache (empty: $EGGROLL_CACHE/text or ~/.cache/eggroll/text)"})
    smoothing: float = field(default=1.0, metadata={"help": "add-k smoothing of the n-gram models"})


def run(cfg: Config) -> dict:
    """Convert (once) and load the corpus; -> manifest summary + unigram/bigram bits/byte."""
    t0 = time.perf_counter()
    directory = prepare_corpus(cfg.dataset, cfg.cache_dir or None, max_bytes=cfg.max_bytes or None,
                               text_column=cfg.text_column)
    splits = load_corpus(cfg.dataset, cfg.cache_dir or None, max_bytes=cfg.max_bytes or None,
                         text_column=cfg.text_column)
    manifest = read_manifest(directory)
    ngram = ngram_bits_per_byte(splits, k=cfg.smoothing)
    return {"dataset": cfg.dataset, "cache": str(directory), "split": manifest["split"],
            **{f"{s}_bytes": manifest["bytes"][s] for s in SPLITS},
            **{f"{s}_documents": manifest["documents"][s] for s in SPLITS},
            **{f"{k}_bits_per_byte": v for k, v in ngram.items()},
            "smoothing_k": cfg.smoothing, "wall_s": round(time.perf_counter() - t0, 3)}
