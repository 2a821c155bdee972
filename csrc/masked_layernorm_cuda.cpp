// Python binding of the masked LayerNorm CUDA kernels (masked_layernorm_cuda.cu).
// Built by megatron_msg/kernels/cuda_ext.py through torch.utils.cpp_extension.load.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

int msg_masked_ln_supported(int dtype, int N, int aligned);
int msg_masked_ln_fwd_staged_supported(int dtype, int N, int aligned, int stages);
cudaError_t msg_masked_ln_fwd(int dtype, int aligned, const void* x, void* y, const float* w, const float* b,
                              const float* c, float* mean, float* rstd, int64_t M, int N, float eps,
                              int sm_count, cudaStream_t stream, int variant, int stages);
cudaError_t msg_masked_ln_bwd(int dtype, int aligned, const void* x, const void* dy, void* dx, const float* w,
                              const float* c, const float* mean, const float* rstd, float* dw_part,
                              float* db_part, int64_t M, int N, int sm_count, cudaStream_t stream, int* owners,
                              int query);

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "masked_layer_norm_cuda: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

int is_aligned(std::initializer_list<const at::Tensor*> ts, uintptr_t bytes) {
  for (auto* t : ts)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % bytes != 0) return 0;
  return 1;
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace

bool supported(const at::Tensor& x) {
  return x.is_cuda() && msg_masked_ln_supported(dtype_code(x), x.size(-1), 1);
}

// Why the staged forwards (variants 2, 3) cannot run on x (contiguous [M, N]) with
// this alignment, or "" when they can: the one place that words the refusal.
std::string staged_refusal_for(const at::Tensor& x, int aligned, int64_t stages) {
  const int N = x.size(1);
  if (msg_masked_ln_fwd_staged_supported(dtype_code(x), N, aligned, static_cast<int>(stages))) return "";
  return c10::str("masked_ln_fwd: the staged kernel needs an sm_90+ GPU and an extension built for it, a 16-byte "
                  "aligned x, 32-byte aligned fp32 weight/bias/mask, a row of a multiple of 16 bytes with at most "
                  "16384 columns, and room for 4+ rows in shared memory; got N=", N, ", dtype ", x.scalar_type(),
                  ", aligned=", aligned);
}

// staged_refusal_for on the tensors fwd would prepare.  Asked from Python before
// the launch so that a refusal is an ordinary Python exception (a C++ exception
// thrown for it through torch 2.11's pybind11 crashed the process on the H100).
std::string staged_refusal(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& c,
                           int64_t stages) {
  if (!x.is_cuda() || x.dim() != 2) return "masked_ln_fwd: x must be a 2-D CUDA tensor";
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto wf = f32(w), bf = f32(b), cf = f32(c);
  // y is a fresh allocation (always aligned); the rest as fwd checks them.
  const int aligned = is_aligned({&xc}, 16) && is_aligned({&wf, &bf, &cf}, 32);
  return staged_refusal_for(xc, aligned, stages);
}

// x: [M, N] contiguous. Returns y, mean, rstd.  variant: 0 auto, 1 registers, 2 staged
// (see masked_layernorm_cuda.cu); stages: ring depth of the staged kernel, 0 = default.
std::vector<at::Tensor> fwd(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_, const at::Tensor& c_,
                            double eps, int64_t variant, int64_t stages) {
  TORCH_CHECK(x_.is_cuda() && x_.dim() == 2, "x must be a 2-D CUDA tensor");
  TORCH_CHECK(variant >= 0 && variant <= 3,
              "masked_ln_fwd: variant must be 0 (auto), 1 (registers), 2 (staged) or 3 (staged, bulk y)");
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto w = f32(w_), b = f32(b_), c = f32(c_);
  const int64_t M = x.size(0);
  const int N = x.size(1);
  auto y = at::empty_like(x);
  auto opts = x.options().dtype(at::kFloat);
  auto mean = at::empty({M}, opts), rstd = at::empty({M}, opts);
  if (M == 0) return {y, mean, rstd};
  // x/y move as 16-byte vectors; w, b, c as Pack<float, 8> (32 bytes) next to
  // 2-byte I/O.  A view into a larger parameter can start anywhere: then the
  // scalar path runs.
  const int aligned = is_aligned({&x, &y}, 16) && is_aligned({&w, &b, &c}, 32);
  if (variant >= 2) {
    const std::string why = staged_refusal_for(x, aligned, stages);
    TORCH_CHECK(why.empty(), why);
  }
  auto err = msg_masked_ln_fwd(dtype_code(x), aligned, x.data_ptr(), y.data_ptr(), w.data_ptr<float>(),
                               b.data_ptr<float>(), c.data_ptr<float>(), mean.data_ptr<float>(),
                               rstd.data_ptr<float>(), M, N, static_cast<float>(eps), sm_count(),
                               at::cuda::getCurrentCUDAStream(), static_cast<int>(variant), static_cast<int>(stages));
  TORCH_CHECK(err == cudaSuccess, "masked_ln_fwd launch failed: ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

// Returns dx, dw, db (dw/db in the dtypes of w and b).
std::vector<at::Tensor> bwd(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_,
                            const at::Tensor& c_, const at::Tensor& mean, const at::Tensor& rstd,
                            at::ScalarType bias_dtype) {
  TORCH_CHECK(x_.is_cuda() && x_.dim() == 2 && dy_.sizes() == x_.sizes(), "bad shapes for masked_ln_bwd");
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto dy = dy_.to(x.scalar_type()).contiguous();
  auto w = f32(w_), c = f32(c_);
  const int64_t M = x.size(0);
  const int N = x.size(1);
  auto dx = at::empty_like(x);
  if (M == 0)
    return {dx, at::zeros({N}, w_.options()), at::zeros({N}, w_.options().dtype(bias_dtype))};
  const int aligned = is_aligned({&x, &dy, &dx}, 16) && is_aligned({&w, &c}, 32);
  const int dt = dtype_code(x);
  auto stream = at::cuda::getCurrentCUDAStream();
  int owners = 0;
  auto err = msg_masked_ln_bwd(dt, aligned, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                               nullptr, M, N, sm_count(), stream, &owners, 1);
  TORCH_CHECK(err == cudaSuccess, "masked_ln_bwd config failed: ", cudaGetErrorString(err));
  auto opts = x.options().dtype(at::kFloat);
  auto dw_part = at::empty({owners, N}, opts), db_part = at::empty({owners, N}, opts);
  err = msg_masked_ln_bwd(dt, aligned, x.data_ptr(), dy.data_ptr(), dx.data_ptr(), w.data_ptr<float>(),
                          c.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                          dw_part.data_ptr<float>(), db_part.data_ptr<float>(), M, N, sm_count(), stream, &owners, 0);
  TORCH_CHECK(err == cudaSuccess, "masked_ln_bwd launch failed: ", cudaGetErrorString(err));
  // Partials are summed on the device: no host round trip.
  auto dw = dw_part.sum(0).to(w_.scalar_type());
  auto db = db_part.sum(0).to(bias_dtype);
  return {dx, dw, db};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Masked LayerNorm (MSG) CUDA kernels";
  m.def("supported", &supported, "whether the kernels cover x's dtype and width");
  m.def("fwd", &fwd, "masked LayerNorm forward -> (y, mean, rstd)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("mask"), py::arg("eps"), py::arg("variant") = 0, py::arg("stages") = 0);
  m.def("staged_refusal", &staged_refusal, "why fwd(variant=2|3) cannot run on these tensors ('' if it can)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mask"), py::arg("stages") = 0);
  m.def("bwd", &bwd, "masked LayerNorm backward -> (dx, dweight, dbias)");
}
