"""Sample-index and blending-index builders: the numpy fallback against a from-the-definition
reference, and the C++ extension against the numpy fallback (bit-identical)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_msg.data import index_builders as ib

HAVE_CPP = ib.load_cpp_helpers() is not None
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason="megatron_msg.data._helpers not built (no C++ toolchain)")


def reference_sample_index(sizes, document_index, seq_length):
    """Straight from the definition: walk the token stream one position at a time."""
    owner = []  # (k, offset) of every stream position
    for k, d in enumerate(document_index):
        owner += [(k, o) for o in range(sizes[d])]
    if not owner:
        return np.zeros((1, 2), dtype=np.int64)
    n = (len(owner) - 1) // seq_length
    return np.array([owner[i * seq_length] for i in range(n + 1)], dtype=np.int64)


def reference_blending(weights, size):
    counts = [0] * len(weights)
    which, within = [], []
    for s in range(size):
        errors = [w * float(s + 1) - float(c) for w, c in zip(weights, counts)]
        d = errors.index(max(errors))
        which.append(d)
        within.append(counts[d])
        counts[d] += 1
    return np.array(which), np.array(within)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=15), data=st.data(),
       seq_length=st.integers(1, 20))
def test_numpy_sample_index_matches_definition(sizes, data, seq_length):
    document_index = data.draw(st.lists(st.integers(0, len(sizes) - 1), min_size=1, max_size=30))
    got = ib.build_sample_index(np.array(sizes), np.array(document_index), seq_length, backend="numpy")
    np.testing.assert_array_equal(got, reference_sample_index(sizes, document_index, seq_length))


@needs_cpp
@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=15), data=st.data(),
       seq_length=st.integers(1, 20))
def test_cpp_sample_index_matches_numpy_small(sizes, data, seq_length):
    document_index = data.draw(st.lists(st.integers(0, len(sizes) - 1), min_size=1, max_size=30))
    a = ib.build_sample_index(np.array(sizes), np.array(document_index), seq_length, backend="cpp")
    b = ib.build_sample_index(np.array(sizes), np.array(document_index), seq_length, backend="numpy")
    assert a.dtype == b.dtype == np.int64
    np.testing.assert_array_equal(a, b)


@needs_cpp
@pytest.mark.parametrize("seed", range(5))
def test_cpp_sample_index_matches_numpy_random_documents(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 3000, 20_000).astype(np.int32)  # includes empty documents
    document_index = rng.permutation(np.tile(np.arange(len(sizes)), 3))
    seq_length = int(rng.integers(1, 4096))
    a = ib.build_sample_index(sizes, document_index, seq_length, backend="cpp")
    b = ib.build_sample_index(sizes, document_index, seq_length, backend="numpy")
    np.testing.assert_array_equal(a, b)


@needs_cpp
@pytest.mark.parametrize("weights", [[1.0], [0.5, 0.5], [0.3, 0.6, 0.1], [1e-4, 0.2, 0.7999], [1 / 3] * 3 + [0.0]])
def test_cpp_blending_matches_python(weights):
    w = ib.normalize_weights(weights)
    for size in (0, 1, 7, 20_001):
        a = ib.build_blending_index(w, size, backend="cpp")
        b = ib.build_blending_index(w, size, backend="numpy")
        assert a[0].dtype == b[0].dtype == np.int16 and a[1].dtype == b[1].dtype == np.int64
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@needs_cpp
def test_cpp_blending_matches_python_random_weights():
    rng = np.random.default_rng(1)
    for _ in range(20):
        w = ib.normalize_weights(rng.random(rng.integers(1, 9)))
        a = ib.build_blending_index(w, 3000, backend="cpp")
        b = ib.build_blending_index(w, 3000, backend="numpy")
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_python_blending_matches_definition_and_weights():
    w = ib.normalize_weights([2, 5, 3])
    which, within = ib.build_blending_index(w, 1000, backend="numpy")
    ref_which, ref_within = reference_blending(list(w), 1000)
    np.testing.assert_array_equal(which, ref_which)
    np.testing.assert_array_equal(within, ref_within)
    # Every prefix is within one sample of the target proportions.
    counts = np.zeros(3)
    for s, d in enumerate(which):
        counts[d] += 1
        assert np.all(np.abs(counts - w * (s + 1)) <= 1.0 + 1e-9)
    # within-dataset indices are 0, 1, 2, ... per dataset
    for d in range(3):
        assert list(within[which == d]) == list(range(int((which == d).sum())))


def test_auto_falls_back_to_numpy_without_extension(monkeypatch):
    """What a user without a compiler gets: backend='auto' silently uses numpy, 'cpp' says why not."""
    monkeypatch.setattr(ib, "load_cpp_helpers", lambda: None)
    sizes, docs = np.array([5, 3, 9]), np.array([2, 0, 1, 2])
    np.testing.assert_array_equal(ib.build_sample_index(sizes, docs, 4),
                                  reference_sample_index(list(sizes), list(docs), 4))
    with pytest.raises(ImportError, match="not built"):
        ib.build_sample_index(sizes, docs, 4, backend="cpp")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="seq_length"):
        ib.build_sample_index(np.array([3]), np.array([0]), 0)
    with pytest.raises(IndexError, match="outside sizes"):
        ib.build_sample_index(np.array([3]), np.array([1]), 2, backend="numpy")
    with pytest.raises(ValueError, match="backend"):
        ib.build_sample_index(np.array([3]), np.array([0]), 2, backend="fortran")
    with pytest.raises(ValueError, match="weights"):
        ib.normalize_weights([0, 0])


@needs_cpp
def test_cpp_rejects_out_of_range_document():
    with pytest.raises(IndexError, match="outside sizes"):
        ib.build_sample_index(np.array([3]), np.array([1]), 2, backend="cpp")


def test_extension_present_when_required():
    """CI sets MSG_REQUIRE_NATIVE=1 where a compiler exists, so a broken build cannot hide behind
    the skips above."""
    import os
    if os.environ.get("MSG_REQUIRE_NATIVE") == "1":
        assert HAVE_CPP, "MSG_REQUIRE_NATIVE=1 but megatron_msg.data._helpers cannot be imported"
