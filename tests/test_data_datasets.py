"""GPT and BERT datasets, splits, blending and the on-disk index cache."""
import os

import numpy as np
import pytest

from megatron_msg.data import build_bert_datasets, build_gpt_datasets
from megatron_msg.data.bert_dataset import IGNORE_INDEX, BERTDatasetConfig, _truncated_lengths
from megatron_msg.data.builders import parse_prefixes_and_weights
from megatron_msg.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megatron_msg.data.splits import parse_splits, split_ranges
from megatron_msg.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def write_corpus(prefix, n_docs, seed, sentences=False, marker=None):
    """Random byte documents (letters, so no special ids); with ``marker`` every token is it."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"tokenizer_fingerprint": TOK.fingerprint()}) as w:
        for _ in range(n_docs):
            n_sent = int(rng.integers(1, 5)) if sentences else 1
            parts = [rng.integers(97, 123, int(rng.integers(3, 60))) for _ in range(n_sent)]
            if marker is not None:
                parts = [np.full(len(p), marker) for p in parts]
            parts[-1] = np.append(parts[-1], TOK.eod)
            w.add_document(np.concatenate(parts), [len(p) for p in parts])
    return prefix


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_corpus(str(d / "a"), 300, 0)
    write_corpus(str(d / "b"), 200, 1, marker=ord("B"))
    write_corpus(str(d / "c"), 200, 2, marker=ord("C"))
    write_corpus(str(d / "s"), 300, 3, sentences=True)
    return d


def gpt(data_dir, prefix="a", **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("cache_dir", None)
    spec = str(data_dir / prefix) if isinstance(prefix, str) else prefix
    return build_gpt_datasets(spec, **kw)


# ---- GPT ---------------------------------------------------------------------------------

def test_gpt_sample_shape_and_dtype(data_dir):
    train, valid, test = gpt(data_dir, splits="8,1,1", num_samples=(50, 5, 5))
    assert (len(train), len(valid), len(test)) == (50, 5, 5)
    item = train[0]
    assert set(item) == {"tokens"} and item["tokens"].dtype == np.int64 and item["tokens"].shape == (33,)
    assert train[-1]["tokens"].shape == (33,)
    with pytest.raises(IndexError):
        train[50]


def test_gpt_is_deterministic_by_seed(data_dir):
    a = gpt(data_dir, seed=7, num_samples=40)[0]
    b = gpt(data_dir, seed=7, num_samples=40)[0]
    c = gpt(data_dir, seed=8, num_samples=40)[0]
    same = [np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(40)]
    diff = [np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(40)]
    assert all(same) and not all(diff)


def test_gpt_one_epoch_by_default(data_dir):
    train = gpt(data_dir, splits="1")[0]
    ds = IndexedDataset(str(data_dir / "a"))
    assert len(train) == (ds.num_tokens - 1) // 32
    assert sorted(train.document_index.tolist()) == list(range(len(ds)))


@pytest.mark.parametrize("wanted_epochs", [1.5, 2.95, 4.0])
def test_gpt_multiple_epochs(data_dir, wanted_epochs):
    ds = IndexedDataset(str(data_dir / "a"))
    per_epoch = (ds.num_tokens - 1) // 32
    n = int(wanted_epochs * per_epoch)
    train = gpt(data_dir, splits="1", num_samples=n)[0]
    assert len(train) == n
    epochs = int(np.ceil((n * 32 + 1) / ds.num_tokens))
    counts = np.bincount(train.document_index, minlength=len(ds))
    assert np.all(counts == epochs)  # every document exactly once per epoch
    assert all(train[i]["tokens"].shape == (33,) for i in range(0, n, max(1, n // 50)))
    assert len(set(train.shuffle_index[:n].tolist())) == n  # no sample used twice


def test_gpt_small_final_epoch_is_shuffled_separately(data_dir):
    ds = IndexedDataset(str(data_dir / "a"))
    per_epoch = (ds.num_tokens - 1) // 32
    train = gpt(data_dir, splits="1", num_samples=per_epoch + 5)[0]
    # The first epoch's documents come first in the document index, then the final epoch's.
    first = train.document_index[:len(ds)]
    assert sorted(first.tolist()) == list(range(len(ds)))
    # ... so the samples used are (almost all) whole first-epoch samples.
    head = (ds.num_tokens - 1) // 32
    assert np.all(np.sort(train.shuffle_index[:head]) == np.arange(head))


def test_splits_are_disjoint_ranges(data_dir):
    train, valid, test = gpt(data_dir, splits="80,15,5")
    docs = [set(d.document_index.tolist()) for d in (train, valid, test)]
    assert docs[0].isdisjoint(docs[1]) and docs[1].isdisjoint(docs[2]) and docs[0].isdisjoint(docs[2])
    assert sorted(set().union(*docs)) == list(range(300))
    assert (len(docs[0]), len(docs[1]), len(docs[2])) == (240, 45, 15)


def test_split_parsing():
    assert parse_splits("969,30,1") == pytest.approx((0.969, 0.03, 0.001))
    assert parse_splits([1]) == (1.0, 0.0, 0.0)
    assert split_ranges(10, (0.5, 0.5, 0.0)) == ((0, 5), (5, 10), (10, 10))
    for bad in ("a,b", [0, 0, 0], [1, 2, 3, 4], [-1, 2]):
        with pytest.raises(ValueError, match="splits"):
            parse_splits(bad)


def test_empty_split_is_none_and_tiny_split_errors(data_dir):
    assert gpt(data_dir, splits="1,0,0")[1:] == (None, None)
    assert gpt(data_dir, splits="1000,1,0")[1] is None  # rounds to 0 documents
    with pytest.raises(ValueError, match="valid split has no documents"):
        gpt(data_dir, splits="1000,1,0", num_samples=(10, 10))
    with pytest.raises(ValueError, match="fewer than one sample"):
        gpt(data_dir, splits="99,1,0", seq_len=2000)


def test_index_cache_hit_and_atomicity(data_dir, tmp_path):
    cache = tmp_path / "cache"
    first = gpt(data_dir, num_samples=30, cache_dir=str(cache))[0]
    files = sorted(os.listdir(cache))
    assert files and not [f for f in files if f.endswith(".tmp")]
    assert any(f.endswith("-description.json") for f in files)
    second = gpt(data_dir, num_samples=30, cache_dir=str(cache))[0]
    assert isinstance(second.sample_index, np.memmap)  # loaded from disk
    np.testing.assert_array_equal(first.shuffle_index, second.shuffle_index)
    assert all(np.array_equal(first[i]["tokens"], second[i]["tokens"]) for i in range(30))
    # A different configuration is a different entry.
    gpt(data_dir, num_samples=30, seed=99, cache_dir=str(cache))
    assert len(os.listdir(cache)) > len(files)


def test_auto_cache_dir_is_next_to_the_data(tmp_path):
    prefix = write_corpus(str(tmp_path / "x"), 20, 0)
    build_gpt_datasets(prefix, seq_len=8, splits="1")
    assert os.listdir(tmp_path / "cache")


def test_cpp_and_numpy_backends_give_the_same_dataset(data_dir):
    from megatron_msg.data.index_builders import load_cpp_helpers
    if load_cpp_helpers() is None:
        pytest.skip("C++ helpers not built")
    a = gpt(data_dir, num_samples=100, backend="cpp")[0]
    b = gpt(data_dir, num_samples=100, backend="numpy")[0]
    np.testing.assert_array_equal(a.sample_index, b.sample_index)


# ---- blending ----------------------------------------------------------------------------

def test_blending_follows_weights(data_dir):
    spec = [(str(data_dir / "b"), 0.25), (str(data_dir / "c"), 0.75)]
    train, valid, _ = gpt(data_dir, prefix=spec, splits="9,1,0", num_samples=(400, 40))
    assert len(train) == 400 and len(valid) == 40
    source = [chr(int(train[i]["tokens"][0])) for i in range(400)]
    # Samples of b are all 'B' (or EOD), of c all 'C': the first token says where it came from.
    first = [s if s in "BC" else chr(int(train[i]["tokens"][1])) for i, s in enumerate(source)]
    assert first.count("B") == 100 and first.count("C") == 300
    assert np.all(train.dataset_index[:8] == [1, 0, 1, 1, 1, 0, 1, 1])


def test_blending_needs_num_samples(data_dir):
    with pytest.raises(ValueError, match="needs an explicit number of samples"):
        gpt(data_dir, prefix=[str(data_dir / "b"), str(data_dir / "c")], splits="1")


def test_prefix_specs():
    assert parse_prefixes_and_weights("x.bin") == [("x", 1.0)]
    assert parse_prefixes_and_weights(["a", "b"]) == [("a", 1.0), ("b", 1.0)]
    assert parse_prefixes_and_weights([0.3, "a", "0.7", "b"]) == [("a", 0.3), ("b", 0.7)]
    assert parse_prefixes_and_weights({"a": 2}) == [("a", 2.0)]
    from pathlib import Path
    assert parse_prefixes_and_weights(Path("d/x")) == [("d/x", 1.0)]
    assert parse_prefixes_and_weights([(Path("a"), 1), ("b", 3)]) == [("a", 1.0), ("b", 3.0)]
    with pytest.raises(ValueError, match="prefixes_and_weights"):
        parse_prefixes_and_weights([])


# ---- BERT --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert(data_dir):
    return build_bert_datasets(str(data_dir / "s"), TOK, max_seq_len=64, seed=5, splits="9,1,0",
                               num_samples=(3000, 50), cache_dir=None)


def test_bert_sample_layout(bert):
    train = bert[0]
    assert len(train) == 3000 and len(bert[1]) == 50 and bert[2] is None
    for i in range(50):
        s = train[i]
        assert set(s) == {"tokens", "token_types", "labels", "loss_mask", "padding_mask", "is_random"}
        assert all(v.dtype == np.int64 for v in s.values())
        n = int(s["padding_mask"].sum())
        assert np.all(s["padding_mask"][:n] == 1) and np.all(s["tokens"][n:] == TOK.pad)
        assert s["tokens"][0] == TOK.cls and s["tokens"][n - 1] == TOK.sep
        seps = np.flatnonzero(s["tokens"] == TOK.sep)
        assert len(seps) == 2 and seps[1] == n - 1
        assert np.all(s["token_types"][:seps[0] + 1] == 0) and np.all(s["token_types"][seps[0] + 1:n] == 1)
        masked = s["loss_mask"] == 1
        assert np.all(s["labels"][~masked] == IGNORE_INDEX)
        assert np.all((s["labels"][masked] >= 97) & (s["labels"][masked] < 123))  # original letters
        assert not np.any(np.isin(s["tokens"][:n], [TOK.eod]))
        assert n <= 64


def test_bert_masking_statistics(bert):
    train = bert[0]
    masked = replaced_mask = replaced_random = kept = candidates = random_nsp = 0
    for i in range(len(train)):
        s = train[i]
        m = s["loss_mask"] == 1
        candidates += int(s["padding_mask"].sum()) - 3
        masked += int(m.sum())
        replaced_mask += int((s["tokens"][m] == TOK.mask).sum())
        kept += int((s["tokens"][m] == s["labels"][m]).sum())
        random_nsp += int(s["is_random"])
    replaced_random = masked - replaced_mask - kept
    assert masked / candidates == pytest.approx(0.15, abs=0.01)
    assert replaced_mask / masked == pytest.approx(0.8, abs=0.02)
    # random replacements that happen to equal the original count as "kept"; rare over 256 ids
    assert replaced_random / masked == pytest.approx(0.1, abs=0.02)
    assert kept / masked == pytest.approx(0.1, abs=0.02)
    assert random_nsp / len(train) == pytest.approx(0.5, abs=0.04)


def test_bert_unmasked_text_is_the_documents_text(data_dir, bert):
    """Undo the masking: A and B are consecutive pieces of one document (swapped when is_random)."""
    train = bert[0]
    ds = IndexedDataset(str(data_dir / "s"))
    docs = [TOK.decode(ds.document(k)) for k in range(ds.num_documents)]
    for i in range(100):
        s = train[i]
        tokens = np.where(s["loss_mask"] == 1, s["labels"], s["tokens"])
        seps = np.flatnonzero(tokens == TOK.sep)
        a, b = TOK.decode(tokens[1:seps[0]]), TOK.decode(tokens[seps[0] + 1:seps[1]])
        if s["is_random"]:
            a, b = b, a
        # Truncation may trim A's end and B's start, so B follows A, not necessarily adjacent.
        assert any(a in d and b in d[d.index(a) + len(a):] for d in docs)


def test_bert_deterministic_per_index(bert, data_dir):
    again = build_bert_datasets(str(data_dir / "s"), TOK, max_seq_len=64, seed=5, splits="9,1,0",
                                num_samples=(3000, 50), cache_dir=None)[0]
    for i in (0, 17, 2999):
        assert all(np.array_equal(bert[0][i][k], again[i][k]) for k in again[i])


def test_bert_on_document_level_data(data_dir):
    """Data preprocessed without sentence splitting: segments are cut at a random token."""
    train = build_bert_datasets(str(data_dir / "a"), TOK, max_seq_len=32, splits="1", cache_dir=None)[0]
    s = train[3]
    assert len(np.flatnonzero(s["tokens"] == TOK.sep)) == 2


def test_bert_needs_bert_tokens(data_dir):
    class NoMask(ByteTokenizer):
        @property
        def special_tokens(self):
            from megatron_msg.data.tokenizer import SpecialTokens
            return SpecialTokens(eod=256)
    from megatron_msg.data.errors import TokenizerMismatchError
    with pytest.raises(TokenizerMismatchError, match="no CLS token"):
        build_bert_datasets(str(data_dir / "s"), NoMask(), max_seq_len=32, splits="1", cache_dir=None)


def test_truncation_closed_form_matches_bert_loop():
    def loop(la, lb, limit):
        while la + lb > limit:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        return la, lb
    for la in range(0, 30):
        for lb in range(0, 30):
            for limit in (1, 2, 7, 20, 61):
                assert _truncated_lengths(la, lb, limit) == loop(la, lb, limit)


def test_bert_config_validation():
    with pytest.raises(ValueError, match="masking_prob"):
        BERTDatasetConfig(masking_prob=1.5)
    with pytest.raises(ValueError, match="max_seq_len"):
        BERTDatasetConfig(max_seq_len=4)


def test_damaged_cache_entry_is_rebuilt(data_dir, tmp_path):
    cache = tmp_path / "cache"
    first = gpt(data_dir, num_samples=30, cache_dir=str(cache))[0]
    for name in os.listdir(cache):
        if name.endswith("shuffle_index.npy"):
            (cache / name).write_bytes(b"garbage")
    again = gpt(data_dir, num_samples=30, cache_dir=str(cache))[0]
    np.testing.assert_array_equal(first.shuffle_index, again.shuffle_index)
