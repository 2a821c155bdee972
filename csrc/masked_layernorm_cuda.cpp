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
                              int sm_count, cudaStream_t stream, int variant, int stages, int hold, int pdl);
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
    // No dtype in the message: a message streaming the ScalarType crashed the
    // process under torch 2.11 on the H100 (see staged_check).
    default: TORCH_CHECK(false, "masked_layer_norm_cuda: unsupported dtype (fp32, fp16 or bf16 only)");
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

// Whether the staged forwards (variants 2, 3) can run on x (contiguous [M, N])
// with this alignment.
bool staged_supported_for(const at::Tensor& x, int aligned, int64_t stages) {
  return msg_masked_ln_fwd_staged_supported(dtype_code(x), x.size(1), aligned, static_cast<int>(stages)) != 0;
}

// (supported, aligned) for the tensors fwd would prepare, asked from Python before
// the launch; cuda_ext.fwd words the refusal.  The message built here (a c10::str
// streaming x.scalar_type()), returned as a string or thrown by TORCH_CHECK,
// crashed the process under torch 2.11 on the H100 every time; plain values do not.
std::pair<bool, bool> staged_check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                   const at::Tensor& c, int64_t stages) {
  if (!x.is_cuda() || x.dim() != 2) return {false, false};
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto wf = f32(w), bf = f32(b), cf = f32(c);
  // y is a fresh allocation (always aligned); the rest as fwd checks them.
  const int aligned = is_aligned({&xc}, 16) && is_aligned({&wf, &bf, &cf}, 32);
  return {staged_supported_for(xc, aligned, stages), aligned != 0};
}

// x: [M, N] contiguous. Returns y, mean, rstd.  variant: 0 auto, 1 registers, 2 staged
// (see masked_layernorm_cuda.cu); stages: ring depth of the staged kernel, 0 = default;
// hold: the staged kernel keeps x in registers (-1 = its default, 0 no, 1 yes);
// pdl: launch the staged kernel with programmatic dependent launch.
std::vector<at::Tensor> fwd(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_, const at::Tensor& c_,
                            double eps, int64_t variant, int64_t stages, int64_t hold, bool pdl) {
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
  if (variant >= 2)
    TORCH_CHECK(staged_supported_for(x, aligned, stages),
                "masked_ln_fwd: the staged kernel cannot run on these tensors (cuda_ext.fwd says why)");
  auto err = msg_masked_ln_fwd(dtype_code(x), aligned, x.data_ptr(), y.data_ptr(), w.data_ptr<float>(),
                               b.data_ptr<float>(), c.data_ptr<float>(), mean.data_ptr<float>(),
                               rstd.data_ptr<float>(), M, N, static_cast<float>(eps), sm_count(),
                               at::cuda::getCurrentCUDAStream(), static_cast<int>(variant), static_cast<int>(stages),
                               static_cast<int>(hold), pdl ? 1 : 0);
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
        py::arg("bias"), py::arg("mask"), py::arg("eps"), py::arg("variant") = 0, py::arg("stages") = 0,
        py::arg("hold") = -1, py::arg("pdl") = true);
  m.def("staged_check", &staged_check, "(can fwd(variant=2|3) run on these tensors, are they aligned)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mask"), py::arg("stages") = 0);
  m.def("bwd", &bwd, "masked LayerNorm backward -> (dx, dweight, dbias)");
}
