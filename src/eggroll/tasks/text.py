"""Byte-level text corpora for language models: load, split, cache, n-gram baselines, streams.

    splits = load_corpus()                      # Python's standard library source, offline
    splits = load_corpus("notes/*.md")          # local text files (a file, a directory or a glob)
    splits = load_corpus("data.jsonl")          # one document per line: {"text": ...}
    splits = load_corpus("minipile")            # Hugging Face datasets (extra: pip install '.[text]')
    ngram_bits_per_byte(splits)                 # unigram / bigram bits per byte, fit on train
    eggroll corpus --dataset stdlib             # CLI (eggroll.corpus): convert, print sizes, n-gram bits/byte

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

Reading the sources and assigning documents to splits: tasks/text_sources.py. The `eggroll
corpus` command: eggroll/corpus.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .text_sources import (ALIASES, HELD_OUT_FRACTION, SPLITS, STDLIB_SKIP_DIRS, Source,  # noqa: F401
                           assign_splits, key_fraction, resolve)

__all__ = ["SEPARATOR", "ByteSplits", "default_cache_dir", "load_corpus", "ngram_bits_per_byte",
           "ngram_counts", "prepare_corpus", "read_manifest", "stream_offsets", "stream_windows"]

SEPARATOR = 0
FORMAT_VERSION = 1


class ByteSplits(NamedTuple):
    """A byte corpus: 1-D uint8 arrays (np.memmap when read from the cache), 0 after each document."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


# ---------------------------------------------------------------------------------------------
# conversion and cache
# ---------------------------------------------------------------------------------------------

def _caps(max_bytes: int | None) -> dict[str, float]:
    if max_bytes is None:
        return dict.fromkeys(SPLITS, float("inf"))
    held = max(1, int(max_bytes * HELD_OUT_FRACTION))
    return {"train": max(1, max_bytes - 2 * held), "valid": held, "test": held}


def _clean(doc: bytes) -> bytes:
    return doc.replace(b"\x00", b"")


def default_cache_dir() -> Path:
    root = os.environ.get("EGGROLL_CACHE")
    return Path(root) / "text" if root else Path.home() / ".cache" / "eggroll" / "text"


def _convert(source: Source, out: Path, max_bytes: int | None) -> dict:
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


def _fingerprint(source: Source, max_bytes: int | None) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "kind": source.kind, "source": source.fingerprint,
                       "max_bytes": max_bytes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_corpus(dataset: str = "stdlib", cache_dir=None, *, max_bytes: int | None = None,
                   text_column: str = "text") -> Path:
    """Convert `dataset` once into the cache (see module docstring); returns its directory."""
    if max_bytes is not None and (not isinstance(max_bytes, (int, np.integer)) or max_bytes < 3):
        raise ValueError(f"max_bytes must be None or an integer >= 3, got {max_bytes!r}")
    max_bytes = None if max_bytes is None else int(max_bytes)
    source = resolve(dataset, text_column, streaming=max_bytes is not None)
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
