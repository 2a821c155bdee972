"""The .bin/.idx files are Megatron-LM's mmap indexed format, byte for byte.

``read_megatron_idx`` below is written from the documented layout only (it shares no code with
megatron_msg.data), so it stands in for Megatron-LM's reader.
"""
import os
import pickle
import struct

import numpy as np
import pytest

from megatron_msg.data.errors import IndexedFormatError
from megatron_msg.data.indexed_dataset import (IndexedDataset, IndexedDatasetWriter, encode_index,
                                               token_dtype_for_vocab)

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def read_megatron_idx(path):
    """Independent reader of the documented .idx layout."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:9] == MAGIC
    version, = struct.unpack_from("<Q", data, 9)
    code, = struct.unpack_from("<B", data, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", data, 18)
    pos = 34
    sizes = struct.unpack_from(f"<{n_seq}i", data, pos); pos += 4 * n_seq
    pointers = struct.unpack_from(f"<{n_seq}q", data, pos); pos += 8 * n_seq
    doc_idx = struct.unpack_from(f"<{n_doc}q", data, pos); pos += 8 * n_doc
    assert pos == len(data)
    return {"version": version, "dtype": DTYPES[code], "sizes": list(sizes), "pointers": list(pointers),
            "doc_idx": list(doc_idx)}


def write_docs(prefix, docs, dtype=np.uint16, sentence_split=False):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            if sentence_split:
                w.add_document(np.concatenate(doc), [len(s) for s in doc])
            else:
                w.add_document(np.asarray(doc), [len(doc)])


def test_header_bytes_are_pinned(tmp_path):
    prefix = str(tmp_path / "d")
    write_docs(prefix, [[5, 6, 7], [8, 9]])
    raw = open(prefix + ".idx", "rb").read()
    # magic, version 1, dtype code 8 (uint16), 2 sequences, 3 document-index entries
    assert raw[:34] == (b"MMIDIDX\x00\x00" + b"\x01" + b"\x00" * 7 + b"\x08"
                        + b"\x02" + b"\x00" * 7 + b"\x03" + b"\x00" * 7)
    # sizes (int32), pointers (int64, bytes), document index (int64)
    assert raw[34:] == (struct.pack("<2i", 3, 2) + struct.pack("<2q", 0, 6) + struct.pack("<3q", 0, 1, 2))
    assert open(prefix + ".bin", "rb").read() == struct.pack("<5H", 5, 6, 7, 8, 9)


def test_independent_reader_reads_our_files(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 70000, rng.integers(1, 6)) for _ in range(rng.integers(1, 4))] for _ in range(20)]
    prefix = str(tmp_path / "s")
    write_docs(prefix, docs, dtype=np.int32, sentence_split=True)
    idx = read_megatron_idx(prefix + ".idx")
    assert idx["version"] == 1 and idx["dtype"] is np.int32
    flat = [s for d in docs for s in d]
    assert idx["sizes"] == [len(s) for s in flat]
    assert idx["doc_idx"] == [0] + list(np.cumsum([len(d) for d in docs]))
    binary = np.fromfile(prefix + ".bin", dtype=np.int32)
    for seq, size, ptr in zip(flat, idx["sizes"], idx["pointers"]):
        assert list(binary[ptr // 4: ptr // 4 + size]) == list(seq)
    ours = IndexedDataset(prefix)
    assert len(ours) == len(flat) and ours.num_documents == len(docs)
    for k, d in enumerate(docs):
        assert list(ours.document(k)) == list(np.concatenate(d))


def test_encode_index_matches_handwritten_layout():
    lengths, docs = np.array([4, 0, 7]), np.array([0, 2, 3])
    expected = (MAGIC + struct.pack("<QBQQ", 1, 4, 3, 3) + struct.pack("<3i", 4, 0, 7)
                + struct.pack("<3q", 0, 16, 16) + struct.pack("<3q", 0, 2, 3))
    assert encode_index(np.int32, lengths, docs) == expected


def test_token_dtype_threshold_matches_megatron():
    assert token_dtype_for_vocab(261) is np.uint16
    assert token_dtype_for_vocab(65499) is np.uint16
    assert token_dtype_for_vocab(65500) is np.int32
    assert token_dtype_for_vocab(250_000) is np.int32


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        write_docs(str(tmp_path / "x"), [[1, 70000]], dtype=np.uint16)
    assert os.listdir(tmp_path) == []  # the aborted writer left nothing, not even temp files


def test_pickle_reopens_instead_of_copying(tmp_path):
    prefix = str(tmp_path / "p")
    write_docs(prefix, [[1, 2, 3]])
    ds = IndexedDataset(prefix)
    blob = pickle.dumps(ds)
    assert len(blob) < 200
    assert list(pickle.loads(blob)[0]) == [1, 2, 3]


# ---- damaged files: loud, specific errors -------------------------------------------------

@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "g")
    write_docs(prefix, [[1, 2, 3], [4, 5], [6]])
    return prefix


def test_truncated_bin(good):
    with open(good + ".bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(IndexedFormatError, match=r"g\.bin: 8 bytes.*12 bytes.*truncated"):
        IndexedDataset(good)


def test_truncated_idx(good):
    size = os.path.getsize(good + ".idx")
    with open(good + ".idx", "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(IndexedFormatError, match=r"g\.idx: .*truncated or corrupt"):
        IndexedDataset(good)


def test_idx_shorter_than_header(good):
    with open(good + ".idx", "r+b") as f:
        f.truncate(10)
    with pytest.raises(IndexedFormatError, match="header"):
        IndexedDataset(good)


def test_bad_magic_version_and_dtype(good):
    raw = bytearray(open(good + ".idx", "rb").read())
    for offset, value, message in ((0, ord("X"), "bad magic"), (9, 2, "version 2"), (17, 9, "dtype code 9")):
        broken = bytearray(raw)
        broken[offset] = value
        open(good + ".idx", "wb").write(bytes(broken))
        with pytest.raises(IndexedFormatError, match=message):
            IndexedDataset(good)


def test_mismatched_pair(tmp_path, good):
    other = str(tmp_path / "o")
    write_docs(other, [[1, 2, 3, 4, 5, 6, 7]])
    os.replace(other + ".bin", good + ".bin")
    with pytest.raises(IndexedFormatError, match="do not belong together"):
        IndexedDataset(good)


def test_missing_file(good):
    os.unlink(good + ".bin")
    with pytest.raises(IndexedFormatError, match=r"g\.bin: file not found"):
        IndexedDataset(good)


def test_inconsistent_pointers(good):
    raw = bytearray(open(good + ".idx", "rb").read())
    struct.pack_into("<q", raw, 34 + 3 * 4 + 8, 2)  # second pointer: 2 instead of 6
    open(good + ".idx", "wb").write(bytes(raw))
    with pytest.raises(IndexedFormatError, match="sequence pointer 1"):
        IndexedDataset(good)
