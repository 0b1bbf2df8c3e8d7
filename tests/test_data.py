"""Data sources -> tokenised fixed-length samples (no network, no /work/shared)."""

import gzip
import json

import numpy as np
import pytest

from spotlight_jax.data import (
    DataSourceError,
    build_samples,
    load_documents,
    pack_samples,
    split_documents,
    stdlib_files,
)


class ByteTokenizer:
    """Tiny stand-in for a HF tokenizer: one id per byte (+3), eos = 2."""

    eos_token_id = 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[b + 3 for b in t.encode()] for t in texts]}


def test_stdlib_default_corpus():
    files = stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    ds = load_documents("stdlib", max_documents=5)
    assert len(ds) == 5 and ds.column_names == ["text", "source"]


def test_local_files_and_errors(tmp_path):
    rows = [{"body": f"document number {i} " * (i + 1), "source": str(i)} for i in range(10)]
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    ds = load_documents(str(path), text_field="body")
    assert len(ds) == 10 and ds[3]["text"] == rows[3]["body"]
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert len(load_documents(str(tmp_path / "a.txt"))) == 2
    with pytest.raises(DataSourceError, match="no such data file"):
        load_documents(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataSourceError, match="no 'nope' column"):
        load_documents(str(path), text_field="nope")
    with pytest.raises(DataSourceError, match="allow-download"):
        load_documents("surely-not-cached/spotlight-test-dataset")


def test_split_documents_is_a_partition():
    train, held = split_documents(50, "train", 0.2, seed=1), split_documents(50, "heldout", 0.2, seed=1)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == list(range(50))
    assert split_documents(50, "heldout", 0.2, seed=1) == held  # deterministic
    assert split_documents(7, "all") == list(range(7))


def test_pack_samples():
    tok = ByteTokenizer()
    texts = ["abc", "", "defgh", "ij"]
    out = pack_samples(texts, tok, seq_len=4, num_samples=10, shuffle_seed=None)
    flat = [ord(c) + 3 for c in "abc"] + [2] + [ord(c) + 3 for c in "defgh"] + [2] + [ord(c) + 3 for c in "ij"] + [2]
    assert out.dtype == np.int32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out.reshape(-1), flat[:12])
    assert pack_samples(texts, tok, seq_len=4, num_samples=2).shape == (2, 4)
    with pytest.raises(DataSourceError, match="not even one"):
        pack_samples(["a"], tok, seq_len=64, num_samples=1)
    with pytest.raises(DataSourceError, match="samples of"):
        pack_samples(texts, tok, seq_len=4, num_samples=10, allow_fewer=False)


def test_build_samples_from_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i} " + "x" * 40}) for i in range(20)))
    train, info = build_samples(ByteTokenizer(), str(path), seq_len=32, num_samples=5, part="train")
    held, _ = build_samples(ByteTokenizer(), str(path), seq_len=32, num_samples=5, part="heldout")
    assert train.shape == (5, 32) and info["documents"] == 16 and held.shape[1] == 32


def test_token_file_samples_round_trip_and_errors(tmp_path):
    from spotlight_jax.data import build_samples, save_samples

    path = str(tmp_path / "train.npz")
    samples = np.arange(3 * 16, dtype=np.int32).reshape(3, 16)
    save_samples(path, samples, {"source": "corpus.jsonl", "part": "train"})
    got, info = build_samples(None, path, seq_len=16, num_samples=2)  # no tokenizer needed
    np.testing.assert_array_equal(got, samples[:2])
    assert info["source"] == "corpus.jsonl" and info["num_samples"] == 2 and info["token_file"] == "train.npz"
    with pytest.raises(ValueError, match="3 x 32"):
        build_samples(None, path, seq_len=32, num_samples=3)
    with pytest.raises(FileNotFoundError, match="save_samples"):
        build_samples(None, str(tmp_path / "missing.npz"), seq_len=16, num_samples=2)
