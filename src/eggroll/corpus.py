"""Convert a text corpus into the byte cache and print its split sizes and n-gram bits/byte.

    eggroll corpus                                   # Python's standard library source, offline
    eggroll corpus --dataset 'notes/**/*.md'         # any local text (a file, a directory, a glob)
    eggroll corpus --dataset minipile --max-bytes 50000000

Converts `dataset` once into the cache (eggroll.tasks.text: documents split 90/5/5 into train /
valid / test, 0 byte after each document), loads it, fits add-k smoothed unigram and bigram
models on train and prints one JSON object: the cache directory, bytes and documents per split,
and the unigram / bigram bits per byte of every split (the baselines a byte LM should beat).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import flag
from .tasks.text import SPLITS, load_corpus, ngram_bits_per_byte, prepare_corpus, read_manifest


@dataclass
class Config:
    dataset: str = flag("stdlib", "corpus: stdlib, a file/dir/glob, minipile, a HF id")
    max_bytes: int = flag(0, "cap on the corpus size in bytes (0: all of it)")
    text_column: str = flag("text", "text field of JSONL files / datasets")
    cache_dir: str = flag("", "cache (empty: $EGGROLL_CACHE/text or ~/.cache/eggroll/text)")
    smoothing: float = flag(1.0, "add-k smoothing of the n-gram models")


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
