"""Byte corpora (tasks/text.py): conversion, cache, splits, n-gram baselines, streams."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from eggroll.tasks import text
from eggroll.tasks.text import (
    ByteSplits,
    load_corpus,
    ngram_bits_per_byte,
    stream_windows,
)


def _docs_of(arr) -> list[bytes]:
    """Documents of a split: the byte runs ended by the separator 0."""
    parts = bytes(np.asarray(arr)).split(b"\x00")
    return [p for p in parts[:-1]] if parts and parts[-1] == b"" else parts


# --- n-gram baselines against brute force --------------------------------------------------

def _brute_ngram(train: bytes, evals: bytes, k: float):
    uni, bi = Counter(train), Counter(zip(b"\x00" + train[:-1], train))
    ctx = Counter(b"\x00" + train[:-1])
    n = len(train)
    u = -sum(math.log2((uni[b] + k) / (n + 256 * k)) for b in evals) / len(evals)
    b = -sum(math.log2((bi[(a, c)] + k) / (ctx[a] + 256 * k)) for a, c in zip(b"\x00" + evals[:-1], evals)) / len(evals)
    return u, b


@pytest.mark.parametrize("k", [1.0, 0.1])
def test_ngram_bits_per_byte_matches_brute_force(k):
    rng = np.random.default_rng(0)
    train = rng.choice(np.frombuffer(b"abcab\x00 xyz", np.uint8), size=300).astype(np.uint8)
    valid = rng.choice(np.frombuffer(b"abq\x00", np.uint8), size=57).astype(np.uint8)
    test = np.frombuffer(b"zz", np.uint8)
    got = ngram_bits_per_byte(ByteSplits(train, valid, test), k=k)
    for name, arr in (("train", train), ("valid", valid), ("test", test)):
        u, b = _brute_ngram(bytes(train), bytes(arr), k)
        assert got[f"unigram_{name}"] == pytest.approx(u, rel=1e-12)
        assert got[f"bigram_{name}"] == pytest.approx(b, rel=1e-12)


def test_ngram_counts_chunked_equals_whole():
    x = np.random.default_rng(1).integers(0, 256, 1000).astype(np.uint8)
    u1, b1 = text.ngram_counts(x)
    u2, b2 = text.ngram_counts(x, chunk=7)
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(b1, b2)
    assert b1.sum() == u1.sum() == len(x)


def test_ngram_sanity_on_deterministic_text():
    # a periodic text is perfectly predictable from the previous byte: bigram << unigram
    x = np.frombuffer(b"abcd" * 50_000, np.uint8)  # big enough for add-one to be negligible
    r = ngram_bits_per_byte(ByteSplits(x, x, x))
    assert r["unigram_valid"] == pytest.approx(2.0, abs=0.05)
    assert r["bigram_valid"] < 0.3
    with pytest.raises(ValueError, match="k must be > 0"):
        ngram_bits_per_byte(ByteSplits(x, x, x), k=0)


# --- streams ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,streams,tokens,overlap", [(50, 4, 7, 0), (50, 4, 7, 1), (13, 5, 3, 1), (10, 3, 25, 0)])
def test_stream_windows_matches_brute_force(n, streams, tokens, overlap):
    data = np.arange(n, dtype=np.uint8)
    for pos in (0, 1, 5, 1000):
        w = stream_windows(data, streams, tokens, pos, overlap=overlap)
        assert w.shape == (streams, tokens + overlap) and w.dtype == np.uint8
        for i in range(streams):
            start = i * n // streams + pos * tokens
            assert list(w[i]) == [data[(start + j) % n] for j in range(tokens + overlap)]


def test_stream_windows_tile_each_stream():
    data = np.random.default_rng(2).integers(0, 256, 97).astype(np.uint8)
    ws = [stream_windows(data, 3, 5, p, overlap=1) for p in range(4)]
    for p in range(3):  # the overlap byte is the next window's first byte
        np.testing.assert_array_equal(ws[p][:, -1], ws[p + 1][:, 0])
    joined = np.concatenate([w[:, :-1] for w in ws], axis=1)
    np.testing.assert_array_equal(joined, stream_windows(data, 3, 20, 0))
    with pytest.raises(ValueError):
        stream_windows(data, 3, 0, 0)


# --- conversion: stdlib, files, JSONL --------------------------------------------------------

@pytest.fixture(scope="module")
def stdlib_small(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, load_corpus("stdlib", cache, max_bytes=200_000)


def test_stdlib_corpus_small(stdlib_small):
    cache, splits = stdlib_small
    assert all(isinstance(a, np.memmap) and a.dtype == np.uint8 and a.ndim == 1 for a in splits)
    assert len(splits.train) <= 180_000 and len(splits.valid) <= 10_000 and len(splits.test) <= 10_000
    assert min(len(a) for a in splits) > 1000
    manifest = text.read_manifest(text.prepare_corpus("stdlib", cache, max_bytes=200_000))
    assert manifest["bytes"] == {s: len(getattr(splits, s)) for s in text.SPLITS}
    assert manifest["split"] == "documents" and manifest["kind"] == "stdlib"
    # Python source: mostly printable ASCII, separators between files
    assert b"def " in bytes(splits.train) and b"import " in bytes(splits.train)
    assert (np.asarray(splits.train) == 0).sum() >= 2
    # the held-out files are not in train
    train_docs = set(_docs_of(splits.train))
    assert not train_docs & set(_docs_of(splits.valid)[:-1])


def test_cache_is_reused_and_deterministic(stdlib_small, tmp_path, monkeypatch):
    cache, splits = stdlib_small
    again = load_corpus("stdlib", cache, max_bytes=200_000)
    for a, b in zip(splits, again):
        np.testing.assert_array_equal(a, b)
    # a second call reads the cache: converting would fail
    monkeypatch.setattr(text, "_convert", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reconverted")))
    load_corpus("stdlib", cache, max_bytes=200_000)
    monkeypatch.undo()
    # a fresh cache gives the same bytes (deterministic split)
    monkeypatch.setenv("EGGROLL_CACHE", str(tmp_path / "env"))
    fresh = load_corpus("stdlib", max_bytes=200_000)
    assert (tmp_path / "env" / "text").is_dir()
    for a, b in zip(splits, fresh):
        np.testing.assert_array_equal(a, b)


def test_corrupt_cache_is_reported(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(4):
        (d / f"{i}.txt").write_text(f"doc {i} " * 10)
    directory = text.prepare_corpus(str(d), tmp_path / "c")
    (directory / "valid.u8").write_bytes(b"xy")
    with pytest.raises(ValueError, match="corrupt corpus cache"):
        load_corpus(str(d), tmp_path / "c")


def test_directory_split_by_document(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").write_text("never read")
    docs = {f"sub/f{i}.txt" if i % 2 else f"f{i}.md": f"document {i}: " + "x" * i + "\u00e9" for i in range(60)}
    for rel, body in docs.items():
        (d / rel).write_text(body, encoding="utf-8")
    (d / "nul.txt").write_bytes(b"a\x00b")  # an inner 0 byte is dropped: 0 only separates
    splits = load_corpus(str(d), tmp_path / "c")
    got = [_docs_of(a) for a in splits]
    assert [len(g) for g in got] == [55, 3, 3]  # 61 documents: round(61 * 0.05) = 3 held out each
    everything = sorted(x for g in got for x in g)
    want = sorted([b.encode("utf-8") for b in docs.values()] + [b"ab"])
    assert everything == want  # each document in exactly one split, whole
    assert all(a[-1] == 0 for a in splits)
    # split membership follows the hash rule
    assign = text.assign_splits(sorted([*docs, "nul.txt"]))
    assert sum(1 for s in assign if s == 1) == len(got[1]) == 3
    # a glob selects a subset
    only_md = load_corpus(str(d / "*.md"), tmp_path / "c")
    assert sum(len(_docs_of(a)) for a in only_md) == 30


def test_single_file_is_split_by_bytes(tmp_path):
    f = tmp_path / "book.txt"
    body = ("It was a bright cold day in April. " * 60).encode()
    f.write_bytes(body)
    splits = load_corpus(str(f), tmp_path / "c")
    assert bytes(np.concatenate([np.asarray(a) for a in splits])) == body + b"\x00"
    n = len(body) + 1
    assert len(splits.valid) == len(splits.test) == int(n * 0.05)
    capped = load_corpus(str(f), tmp_path / "c", max_bytes=400)
    assert sum(len(a) for a in capped) == 400


def test_jsonl_documents(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"text": f"row {i} " + "abc" * i, "id": i} for i in range(40)]
    f.write_text("\n".join(json.dumps(r) for r in rows[:20]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[20:]))
    splits = load_corpus(str(f), tmp_path / "c")
    everything = sorted(x for a in splits for x in _docs_of(a))
    assert everything == sorted(r["text"].encode() for r in rows)
    assert all(len(_docs_of(a)) >= 1 for a in splits)
    g = tmp_path / "other.jsonl"
    g.write_text('{"body": "x"}\n{"body": "y"}\n{"body": "z"}\n')
    with pytest.raises(TypeError, match="no string field 'text'"):
        load_corpus(str(g), tmp_path / "c")
    assert sorted(x for a in load_corpus(str(g), tmp_path / "c", text_column="body") for x in _docs_of(a)) == [b"x", b"y", b"z"]


def test_assign_splits_properties():
    keys = [f"file{i}.py" for i in range(200)]
    a = text.assign_splits(keys)
    assert a.count(1) == a.count(2) == 10 and a.count(0) == 180
    assert a == text.assign_splits(keys)  # deterministic
    assert text.assign_splits(keys[:3]).count(0) == 1
    # order of the input does not matter
    rev = text.assign_splits(keys[::-1])
    assert rev[::-1] == a


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nosuchthing'"):
        load_corpus("nosuchthing", tmp_path)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_corpus(str(tmp_path / "*.nothing"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        load_corpus(str(tmp_path / "empty"), tmp_path)
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(3):
        (blank / f"{i}.txt").write_bytes(b"\x00" * i)
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(blank), tmp_path / "c")
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus("stdlib", tmp_path, max_bytes=0)
    with pytest.raises(ValueError, match="non-empty string"):
        load_corpus("", tmp_path)


# --- Hugging Face datasets (optional extra) ---------------------------------------------------

def test_hf_saved_dataset_conversion(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"hf row {i} " + "q" * (i % 7) for i in range(50)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(50))}).save_to_disk(str(tmp_path / "ds"))
    splits = load_corpus(str(tmp_path / "ds"), tmp_path / "c")
    got = [_docs_of(a) for a in splits]
    assert sorted(x for g in got for x in g) == sorted(t.encode() for t in texts)
    assert len(got[1]) == len(got[2]) == 2
    # own validation / test splits are kept
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"content": ["alpha", "beta", "gamma"]}),
        "validation": datasets.Dataset.from_dict({"content": ["delta"]}),
        "test": datasets.Dataset.from_dict({"content": ["epsilon", "zeta"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    s = load_corpus(str(tmp_path / "dd"), tmp_path / "c", text_column="content")
    assert [_docs_of(a) for a in s] == [[b"alpha", b"beta", b"gamma"], [b"delta"], [b"epsilon", b"zeta"]]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_corpus(str(tmp_path / "dd"), tmp_path / "c")


def test_missing_datasets_package_is_explained(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ModuleNotFoundError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ModuleNotFoundError, match=r"eggroll-jax\[text\]"):
        load_corpus("someone/some-corpus", tmp_path)


def test_corpus_cli(tmp_path, capsys):
    from eggroll import cli

    f = tmp_path / "notes.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"note number {i}"}) for i in range(25)))
    assert cli.main(["corpus", "--dataset", str(f), "--cache-dir", str(tmp_path / "c")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    splits = load_corpus(str(f), tmp_path / "c")
    assert out["train_bytes"] == len(splits.train) and out["valid_documents"] == 1
    assert out["bigram_valid_bits_per_byte"] == ngram_bits_per_byte(splits)["bigram_valid"]
    assert cli.main(["corpus", "--dataset", str(tmp_path / "missing.txt"), "--cache-dir", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_hf_hub_unreachable_is_explained(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def offline(name, config=None, streaming=False):
        calls.append((name, config, streaming))
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="cannot load Hugging Face dataset 'JeanKaddour/minipile'"):
        load_corpus("minipile", tmp_path, max_bytes=1000)
    with pytest.raises(FileNotFoundError, match="'someone/corpus'"):
        load_corpus("someone/corpus:en", tmp_path)
    assert calls == [("JeanKaddour/minipile", None, True), ("someone/corpus", "en", False)]
