// Hot loops of the dataset index builders, exposed to Python as megatron_msg.data._helpers.
//
// Each function has a numpy twin in megatron_msg/data/index_builders.py that defines the exact
// semantics; tests check that both give identical arrays.  Build flags include
// -ffp-contract=off so the blending arithmetic rounds exactly like numpy/Python doubles.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Sample index of a GPT dataset.
//
// The token stream is the concatenation of sequences sizes[document_index[0]],
// sizes[document_index[1]], ...  Sample i covers stream positions [i*seq_length,
// (i+1)*seq_length] (seq_length + 1 tokens: inputs plus the shifted label), so there are
// n = (total_tokens - 1) / seq_length full samples.  Row i (0 <= i <= n) of the result is
// (k, offset): the stream position i*seq_length is token `offset` of the sequence at
// document_index[k], with k the first position whose sequence ends after it (so empty
// sequences are skipped and a position on a boundary maps to the next sequence's start).
py::array_t<int64_t> build_sample_index(const Int32Array &sizes_in, const Int64Array &document_index_in,
                                        int64_t seq_length) {
  if (seq_length < 1) throw std::invalid_argument("seq_length must be >= 1");
  if (sizes_in.ndim() != 1 || document_index_in.ndim() != 1)
    throw std::invalid_argument("sizes and document_index must be 1-D");
  const int32_t *sizes = sizes_in.data();
  const int64_t *docs = document_index_in.data();
  const int64_t num_sizes = sizes_in.shape(0);
  const int64_t num_docs = document_index_in.shape(0);

  // Pass 1: gather the lengths in stream order (the only random access into `sizes`) and
  // validate; pass 2 then walks them sequentially.
  std::vector<int32_t> lengths(num_docs);
  int64_t total = 0;
  for (int64_t k = 0; k < num_docs; ++k) {
    const int64_t d = docs[k];
    if (d < 0 || d >= num_sizes)
      throw std::out_of_range("document_index[" + std::to_string(k) + "] = " + std::to_string(d) +
                              " is outside sizes (length " + std::to_string(num_sizes) + ")");
    if (sizes[d] < 0) throw std::invalid_argument("negative size at " + std::to_string(d));
    lengths[k] = sizes[d];
    total += sizes[d];
  }
  const int64_t num_samples = total > 0 ? (total - 1) / seq_length : 0;

  py::array_t<int64_t> result({num_samples + 1, static_cast<int64_t>(2)});
  int64_t *out = result.mutable_data();
  if (total == 0) {  // no tokens at all: a single (0, 0) row, zero samples
    out[0] = 0;
    out[1] = 0;
    return result;
  }
  {
    py::gil_scoped_release release;  // pure C++ from here on; let other threads run
    int64_t i = 0;               // next sample row to fill
    int64_t position = 0;        // its stream position, i * seq_length
    int64_t doc_start = 0;       // stream position of sequence k's first token
    for (int64_t k = 0; k < num_docs && i <= num_samples; ++k) {
      const int64_t doc_end = doc_start + lengths[k];
      // Every sample start inside [doc_start, doc_end) belongs to sequence k.
      for (; i <= num_samples && position < doc_end; ++i, position += seq_length) {
        out[2 * i] = k;
        out[2 * i + 1] = position - doc_start;
      }
      doc_start = doc_end;
    }
  }
  return result;
}

// Blending index: which dataset (and which of its samples) serves each blended sample.
//
// Greedy and deterministic: blended sample s goes to the dataset whose count lags its target
// w_d * (s + 1) the most (lowest index on ties).  Every prefix of the result then matches the
// weights to within one sample per dataset.
py::tuple build_blending_index(const DoubleArray &weights_in, int64_t size) {
  if (weights_in.ndim() != 1 || weights_in.shape(0) < 1)
    throw std::invalid_argument("weights must be a non-empty 1-D array");
  if (weights_in.shape(0) > 32767) throw std::invalid_argument("at most 32767 datasets can be blended");
  if (size < 0) throw std::invalid_argument("size must be >= 0");
  const double *weights = weights_in.data();
  const int64_t num_datasets = weights_in.shape(0);

  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t *which = dataset_index.mutable_data();
  int64_t *within = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(num_datasets, 0);
    for (int64_t s = 0; s < size; ++s) {
      const double target_step = static_cast<double>(s + 1);
      int64_t best = 0;
      double best_error = weights[0] * target_step - static_cast<double>(counts[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = weights[d] * target_step - static_cast<double>(counts[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      which[s] = static_cast<int16_t>(best);
      within[s] = counts[best];
      ++counts[best];
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ index builders for megatron_msg.data (numpy fallbacks in index_builders.py)";
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"));
  m.def("build_blending_index", &build_blending_index, py::arg("weights"), py::arg("size"));
}
