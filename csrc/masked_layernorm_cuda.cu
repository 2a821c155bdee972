// Masked LayerNorm (MSG eq. 16-19) forward and backward, CUDA.
//
//   S = sum(c); mu = sum(c x)/S; var = sum(c (x-mu)^2)/S; r = rsqrt(var+eps)
//   y = c (w (x-mu) r + b)
//   g = c w dy;  dx = r (g - c (sum(g)/S + xhat sum(g xhat)/S))
//   dw = sum_rows(c dy xhat);  db = sum_rows(c dy)
//
// Layout: a row is owned either by one warp (narrow rows, shuffle-only
// reductions) or by one block (wide rows).  Each thread owns the same columns
// of every row it visits (16-byte vectors, coalesced across the warp), so the
// backward accumulates dw/db partials in registers over a persistent grid-stride
// loop and writes one fp32 partial row per row-owner; the host sums those
// partials on the device.  All arithmetic is fp32; I/O is fp32, fp16 or bf16;
// w, b, c are fp32 (the binding casts them).  This file has no torch
// dependency, so nvcc compiles it quickly; masked_layernorm_cuda.cpp binds it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace msg {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
// w, b, c are fp32, read as Pack<float, VEC> at column j*VEC, so those loads are
// vector loads too; the binding passes aligned = 0 (scalar path) unless x/y are
// 16-byte and w/b/c 32-byte aligned.

__device__ __forceinline__ float2 warp_sum2(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over the threads that own a row: the warp (WARP_ROW) or the whole block.
template <bool WARP_ROW>
__device__ __forceinline__ float2 row_sum2(float2 v, float2* sh) {
  v = warp_sum2(v);
  if (WARP_ROW) return v;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float2 t = (threadIdx.x < nw) ? sh[threadIdx.x] : make_float2(0.f, 0.f);
  if (wid == 0) t = warp_sum2(t);
  if (threadIdx.x == 0) sh[32] = t;
  __syncthreads();
  return sh[32];
}

// Geometry shared by forward and backward.
template <bool WARP_ROW> struct RowGeom {
  int lane, nlanes;       // this thread's index among the row's owners, and their count
  int64_t first, stride;  // first row and row step of this owner
  int owner;              // global index of this row owner (for the partial buffers)
  __device__ RowGeom() {
    if (WARP_ROW) {
      const int wpb = blockDim.x >> 5;
      lane = threadIdx.x & 31; nlanes = 32;
      owner = blockIdx.x * wpb + (threadIdx.x >> 5);
      first = owner; stride = (int64_t)gridDim.x * wpb;
    } else {
      lane = threadIdx.x; nlanes = blockDim.x;
      owner = blockIdx.x; first = blockIdx.x; stride = gridDim.x;
    }
  }
};

// Forward: one row per warp (narrow) or block (wide) slot, no persistent loop.
// The row slice stays in registers in the I/O dtype (half the registers of an
// fp32 copy, so more rows fit per SM), and S = sum(c) is reduced together with
// sum(c x) in one row reduction: the mask vector is read with 16-byte loads
// alongside x instead of by a separate per-row pass.
template <typename T, int VEC, int ITERS, bool WARP_ROW>
__global__ void masked_ln_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                     const float* __restrict__ b, const float* __restrict__ c,
                                     float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                     int64_t M, int N, float eps) {
  __shared__ float2 sh[33];
  RowGeom<WARP_ROW> g;
  const int nvec = N / VEC;

  for (int64_t row = g.first; row < M; row += g.stride) {
    const Pack<T, VEC>* xr = reinterpret_cast<const Pack<T, VEC>*>(x + row * N);
    Pack<T, VEC> xp[ITERS];
    float2 s = make_float2(0.f, 0.f);  // (sum c x, sum c)
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = g.lane + i * g.nlanes;
      if (j < nvec) {
        xp[i] = xr[j];
        const Pack<float, VEC> pc = reinterpret_cast<const Pack<float, VEC>*>(c)[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          s.x += pc.v[k] * to_f(xp[i].v[k]);
          s.y += pc.v[k];
        }
      }
    }
    s = row_sum2<WARP_ROW>(s, sh);
    const float inv_s = 1.f / s.y;
    const float mu = s.x * inv_s;
    float s2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = g.lane + i * g.nlanes;
      if (j < nvec) {
        const Pack<float, VEC> pc = reinterpret_cast<const Pack<float, VEC>*>(c)[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = to_f(xp[i].v[k]) - mu;
          s2 += pc.v[k] * d * d;
        }
      }
    }
    const float var = row_sum2<WARP_ROW>(make_float2(s2, 0.f), sh).x * inv_s;
    const float r = rsqrtf(var + eps);
    Pack<T, VEC>* yr = reinterpret_cast<Pack<T, VEC>*>(y + row * N);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = g.lane + i * g.nlanes;
      if (j < nvec) {
        Pack<T, VEC> p;
        const Pack<float, VEC> pc = reinterpret_cast<const Pack<float, VEC>*>(c)[j];
        const Pack<float, VEC> pw = reinterpret_cast<const Pack<float, VEC>*>(w)[j];
        const Pack<float, VEC> pb = reinterpret_cast<const Pack<float, VEC>*>(b)[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          p.v[k] = from_f<T>(((to_f(xp[i].v[k]) - mu) * r * pw.v[k] + pb.v[k]) * pc.v[k]);
        yr[j] = p;
      }
    }
    if (g.lane == 0) { mean_out[row] = mu; rstd_out[row] = r; }
  }
}

// ---------------------------------------------------------------------------
// Staged forward for wide rows (sm_90+).
//
// Why: a row held in registers caps the rows in flight per SM (at 10240 the
// register file holds two rows, and load, reduce and store of a row run in
// sequence), which leaves DRAM half idle (docs/kernel_notes.md).  Here one
// persistent block per SM keeps only its columns' constants in registers
// (c, c*w, c*b, and S = sum(c) once), while the bulk-copy engine streams whole
// rows into a ring of STAGES shared-memory buffers: later rows load while the
// current pair is reduced and written.  Each thread reads back exactly the
// vectors it owns, so the only block-wide syncs are the two reductions per
// pair (and, with bulk_y, one before a pair's y leaves by bulk copy).
// y = (x - mu) r (c w) + c b equals c (w (x - mu) r + b) up to fp32 rounding,
// and exactly at c = 0 (zero) and c = 1 (the unmasked LayerNorm).

constexpr int kMaxStages = 12;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// Announce `bytes` on the barrier and start one bulk copy global -> shared that
// completes them.  Issued by a single thread.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_u32(dst)),
      "l"(static_cast<uint64_t>(__cvta_generic_to_global(src))), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

// Bulk copy shared -> global (the TMA unit writes the row; the SM issues one
// instruction instead of a row of vector stores), tracked as a bulk group.
__device__ __forceinline__ void bulk_store(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                   static_cast<uint64_t>(__cvta_generic_to_global(dst))),
               "r"(smem_u32(src)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Until the committed bulk stores have read their shared memory (reuse is safe after).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  }
}

// Rows are taken in pairs: the two-pass statistics of both rows travel in one
// float2 block reduction, so a pair costs the block barriers one row used to,
// and two rows' independent work hides each other's latency (one 512-thread
// block per SM has little else to switch to).
//
// HOLD: a thread's ITERS vectors of x stay in registers after the first pass
// instead of being read from shared memory three times (they spill from 10240
// columns up; see the kernel sweep in docs/benchmarks.md).
template <typename T, int VEC, int ITERS, bool HOLD>
__global__ void __launch_bounds__(512, 1)
    masked_ln_fwd_staged_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                const float* __restrict__ b, const float* __restrict__ c,
                                float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t M, int N,
                                float eps, int stages, int bulk_y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char ring[];  // stages x one row in the I/O dtype
  __shared__ __align__(8) uint64_t bars[kMaxStages];
  __shared__ float2 sh[33];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int nvec = N / VEC;
  const uint32_t row_bytes = static_cast<uint32_t>(N) * sizeof(T);
  const int64_t first = blockIdx.x, stride = gridDim.x;
  const int64_t my_rows = first < M ? (M - 1 - first) / stride + 1 : 0;
  // The k-th row of this block sits in buffer k % stages; a buffer's n-th row
  // completes barrier phase n, so row k waits for parity (k / stages) & 1.
  auto load_row = [&](int64_t k) {
    const int s = static_cast<int>(k % stages);
    bulk_load(ring + s * row_bytes, x + (first + k * stride) * N, row_bytes, &bars[s]);
  };

  if (tid == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&bars[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // Launched with programmatic dependent launch (pdl), the block got here while
  // the previous kernel on the stream may still run: nothing in global memory is
  // read or written before it has finished.  Without pdl both are no-ops.  The
  // next kernel's blocks may then be scheduled as ours exit.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (tid == 0)
    for (int64_t k = 0; k < stages && k < my_rows; ++k) load_row(k);

  // Column constants, loaded while the first rows stream in.
  float cc[ITERS][VEC], cw[ITERS][VEC], cb[ITERS][VEC];
  float csum = 0.f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int j = tid + i * nthreads;
    if (j < nvec) {
      const Pack<float, VEC> pc = reinterpret_cast<const Pack<float, VEC>*>(c)[j];
      const Pack<float, VEC> pw = reinterpret_cast<const Pack<float, VEC>*>(w)[j];
      const Pack<float, VEC> pb = reinterpret_cast<const Pack<float, VEC>*>(b)[j];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        cc[i][k] = pc.v[k]; cw[i][k] = pc.v[k] * pw.v[k]; cb[i][k] = pc.v[k] * pb.v[k];
        csum += pc.v[k];
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) { cc[i][k] = 0.f; cw[i][k] = 0.f; cb[i][k] = 0.f; }
    }
  }
  const float inv_s = 1.f / row_sum2<false>(make_float2(csum, 0.f), sh).x;

  for (int64_t k = 0; k < my_rows; k += 2) {
    const bool two = k + 1 < my_rows;  // an odd last row goes alone (its partner reads row k again)
    const int64_t k1 = two ? k + 1 : k;
    mbar_wait(&bars[k % stages], static_cast<uint32_t>((k / stages) & 1));
    if (two) mbar_wait(&bars[k1 % stages], static_cast<uint32_t>((k1 / stages) & 1));
    const Pack<T, VEC>* xa = reinterpret_cast<const Pack<T, VEC>*>(ring + (k % stages) * row_bytes);
    const Pack<T, VEC>* xb = reinterpret_cast<const Pack<T, VEC>*>(ring + (k1 % stages) * row_bytes);
    float2 sx = make_float2(0.f, 0.f);
    Pack<T, VEC> ha[HOLD ? ITERS : 1], hb[HOLD ? ITERS : 1];  // x held in registers
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = tid + i * nthreads;
      if (j < nvec) {
        const Pack<T, VEC> pa = xa[j], pb = xb[j];
        if (HOLD) { ha[HOLD ? i : 0] = pa; hb[HOLD ? i : 0] = pb; }
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          sx.x += cc[i][q] * to_f(pa.v[q]);
          sx.y += cc[i][q] * to_f(pb.v[q]);
        }
      }
    }
    sx = row_sum2<false>(sx, sh);
    const float mua = sx.x * inv_s, mub = sx.y * inv_s;
    // Past that reduction every thread is done with the previous pair, so its
    // buffers take the rows `stages` ahead of them.
    if (tid == 0 && k >= 2) {
      if (bulk_y) bulk_wait_read();  // the previous pair's y rows have left those buffers
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      for (int64_t p = k - 2; p < k; ++p)
        if (p + stages < my_rows) load_row(p + stages);
    }
    float2 s2 = make_float2(0.f, 0.f);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = tid + i * nthreads;
      if (j < nvec) {
        const Pack<T, VEC> pa = HOLD ? ha[HOLD ? i : 0] : xa[j], pb = HOLD ? hb[HOLD ? i : 0] : xb[j];
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          const float da = to_f(pa.v[q]) - mua, db = to_f(pb.v[q]) - mub;
          s2.x += cc[i][q] * da * da;
          s2.y += cc[i][q] * db * db;
        }
      }
    }
    s2 = row_sum2<false>(s2, sh);
    const float ra = rsqrtf(s2.x * inv_s + eps), rb = rsqrtf(s2.y * inv_s + eps);
    Pack<T, VEC>* ya = reinterpret_cast<Pack<T, VEC>*>(y + (first + k * stride) * N);
    Pack<T, VEC>* yb = reinterpret_cast<Pack<T, VEC>*>(y + (first + k1 * stride) * N);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = tid + i * nthreads;
      if (j < nvec) {
        const Pack<T, VEC> pa = HOLD ? ha[HOLD ? i : 0] : xa[j], pb = HOLD ? hb[HOLD ? i : 0] : xb[j];
        Pack<T, VEC> oa, ob;
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          oa.v[q] = from_f<T>((to_f(pa.v[q]) - mua) * ra * cw[i][q] + cb[i][q]);
          ob.v[q] = from_f<T>((to_f(pb.v[q]) - mub) * rb * cw[i][q] + cb[i][q]);
        }
        if (bulk_y) {  // y replaces x in the thread's own slots, then leaves by bulk copy
          const_cast<Pack<T, VEC>*>(xa)[j] = oa;
          if (two) const_cast<Pack<T, VEC>*>(xb)[j] = ob;
        } else {
          ya[j] = oa;
          if (two) yb[j] = ob;
        }
      }
    }
    if (bulk_y) {
      __syncthreads();
      if (tid == 0) {
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        bulk_store(ya, xa, row_bytes);
        if (two) bulk_store(yb, xb, row_bytes);
        bulk_commit();
      }
    }
    if (tid == 0) {
      mean_out[first + k * stride] = mua; rstd_out[first + k * stride] = ra;
      if (two) { mean_out[first + k1 * stride] = mub; rstd_out[first + k1 * stride] = rb; }
    }
  }
  if (bulk_y && tid == 0) bulk_wait_all();
#endif
}

template <typename T, int VEC, int ITERS, bool WARP_ROW>
__global__ void masked_ln_bwd_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                                     const float* __restrict__ w, const float* __restrict__ c,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     float* __restrict__ dw_part, float* __restrict__ db_part,
                                     int64_t M, int N) {
  __shared__ float2 sh[33];
  RowGeom<WARP_ROW> g;
  const int nvec = N / VEC;
  float cs = 0.f;
  for (int j = g.lane; j < nvec; j += g.nlanes)
#pragma unroll
    for (int k = 0; k < VEC; ++k) cs += __ldg(c + j * VEC + k);
  const float inv_s = 1.f / row_sum2<WARP_ROW>(make_float2(cs, 0.f), sh).x;

  float dw_acc[ITERS][VEC], db_acc[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) { dw_acc[i][k] = 0.f; db_acc[i][k] = 0.f; }

  for (int64_t row = g.first; row < M; row += g.stride) {
    const Pack<T, VEC>* xr = reinterpret_cast<const Pack<T, VEC>*>(x + row * N);
    const Pack<T, VEC>* dyr = reinterpret_cast<const Pack<T, VEC>*>(dy + row * N);
    const float mu = __ldg(mean + row), r = __ldg(rstd + row);
    float xh[ITERS][VEC], gv[ITERS][VEC];
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = g.lane + i * g.nlanes;
      if (j < nvec) {
        Pack<T, VEC> px = xr[j], pd = dyr[j];
        const Pack<float, VEC> pc = reinterpret_cast<const Pack<float, VEC>*>(c)[j];
        const Pack<float, VEC> pw = reinterpret_cast<const Pack<float, VEC>*>(w)[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float cc = pc.v[k];
          const float xhat = (to_f(px.v[k]) - mu) * r;
          const float dyc = to_f(pd.v[k]) * cc;
          const float gg = dyc * pw.v[k];
          xh[i][k] = xhat; gv[i][k] = gg;
          s.x += gg; s.y += gg * xhat;
          dw_acc[i][k] += dyc * xhat; db_acc[i][k] += dyc;
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) { xh[i][k] = 0.f; gv[i][k] = 0.f; }
      }
    }
    s = row_sum2<WARP_ROW>(s, sh);
    const float a = s.x * inv_s, bc = s.y * inv_s;
    Pack<T, VEC>* dxr = reinterpret_cast<Pack<T, VEC>*>(dx + row * N);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int j = g.lane + i * g.nlanes;
      if (j < nvec) {
        Pack<T, VEC> p;
        const Pack<float, VEC> pc = reinterpret_cast<const Pack<float, VEC>*>(c)[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) p.v[k] = from_f<T>(r * (gv[i][k] - pc.v[k] * (a + xh[i][k] * bc)));
        dxr[j] = p;
      }
    }
  }
  float* dwp = dw_part + (int64_t)g.owner * N;
  float* dbp = db_part + (int64_t)g.owner * N;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int j = g.lane + i * g.nlanes;
    if (j < nvec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) { dwp[j * VEC + k] = dw_acc[i][k]; dbp[j * VEC + k] = db_acc[i][k]; }
    }
  }
}

// ---------------------------------------------------------------------------
// Launch configuration.  dtype: 0 fp32, 1 fp16, 2 bf16.

struct Config {
  bool warp_row;
  int vec, iters, threads;
};

static Config choose(int dtype, int N, bool aligned) {
  const int elt = dtype == 0 ? 4 : 2;
  Config cfg;
  cfg.vec = (aligned && N % (16 / elt) == 0) ? 16 / elt : 1;
  const int nvec = N / cfg.vec;
  if (nvec <= 32 * 4) {  // a warp per row, up to 4 vectors per lane
    cfg.warp_row = true;
    cfg.iters = nvec <= 32 ? 1 : (nvec <= 64 ? 2 : 4);
    cfg.threads = 128;
    return cfg;
  }
  cfg.warp_row = false;
  cfg.iters = 1;
  while ((nvec + cfg.iters - 1) / cfg.iters > 512 && cfg.iters < 16) cfg.iters *= 2;
  const int t = (nvec + cfg.iters - 1) / cfg.iters;
  cfg.threads = ((t + 31) / 32) * 32;
  if (cfg.threads > 1024) cfg.threads = 0;  // unsupported width
  return cfg;
}

template <typename F>
static cudaError_t dispatch(int dtype, const Config& cfg, F&& f) {
#define MSG_ITERS(T, V, WR)                                 \
  switch (cfg.iters) {                                      \
    case 1: return f.template run<T, V, 1, WR>();           \
    case 2: return f.template run<T, V, 2, WR>();           \
    case 4: return f.template run<T, V, 4, WR>();           \
    case 8: if constexpr (!WR) return f.template run<T, V, 8, WR>();  \
            break;                                          \
    case 16: if constexpr (!WR) return f.template run<T, V, 16, WR>(); \
             break;                                         \
  }                                                         \
  return cudaErrorInvalidValue;
#define MSG_WR(T, V) \
  if (cfg.warp_row) { MSG_ITERS(T, V, true) } else { MSG_ITERS(T, V, false) }
  if (dtype == 0) { if (cfg.vec == 4) { MSG_WR(float, 4) } else { MSG_WR(float, 1) } }
  if (dtype == 1) { if (cfg.vec == 8) { MSG_WR(__half, 8) } else { MSG_WR(__half, 1) } }
  if (dtype == 2) { if (cfg.vec == 8) { MSG_WR(__nv_bfloat16, 8) } else { MSG_WR(__nv_bfloat16, 1) } }
#undef MSG_WR
#undef MSG_ITERS
  return cudaErrorInvalidValue;
}

static int rows_per_block(const Config& cfg) { return cfg.warp_row ? cfg.threads / 32 : 1; }

// Number of blocks of a persistent launch: fill every SM to its occupancy, but
// no more row owners than rows.
template <typename K>
static int persistent_blocks(K kernel, const Config& cfg, int64_t M, int sm_count, int max_per_sm) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, cfg.threads, 0) != cudaSuccess || per_sm < 1)
    per_sm = 1;
  if (per_sm > max_per_sm) per_sm = max_per_sm;
  const int rpb = rows_per_block(cfg);
  int64_t need = (M + rpb - 1) / rpb;
  int64_t blocks = (int64_t)sm_count * per_sm;
  if (blocks > need) blocks = need;
  return blocks < 1 ? 1 : (int)blocks;
}

struct FwdLaunch {
  const Config& cfg; const void* x; void* y; const float *w, *b, *c; float *mean, *rstd;
  int64_t M; int N; float eps; int sm_count; cudaStream_t stream;
  template <typename T, int V, int I, bool WR> cudaError_t run() {
    auto k = masked_ln_fwd_kernel<T, V, I, WR>;
    // One row (per warp or block) per launch slot: no persistent loop, so the
    // scheduler keeps as many rows in flight as registers allow.
    const int rpb = rows_per_block(cfg);
    const int64_t need = (M + rpb - 1) / rpb;
    const int blocks = need > 0x7fffffff ? 0x7fffffff : (int)need;
    k<<<blocks, cfg.threads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), w, b, c, mean, rstd, M, N, eps);
    return cudaGetLastError();
  }
};

// Staged forward: VEC 4 for every dtype (16-byte fp32 constants; 8-byte bf16
// vectors from shared memory), at most 512 threads (the kernel's launch bounds),
// up to 8 vectors per thread, kStagedMinStages..kMaxStages row buffers.
constexpr int kStagedVec = 4;
constexpr int kStagedThreads = 512;
constexpr int kStagedDefaultStages = 6;  // fewer where 6 rows do not fit
// A pair's buffers are refilled one pair later, after the next pair's first
// reduction, so the ring must hold two pairs: with fewer buffers a pair would
// wait for rows that are only requested after that wait.
constexpr int kStagedMinStages = 4;

struct StagedConfig {
  int iters = 0, threads = 0, stages = 0;  // threads == 0: unsupported
  int bulk_y = 0;                          // y leaves through shared memory by bulk copy
  bool hold = false;                       // x kept in registers between the passes
  int pdl = 0;                             // launched with programmatic dependent launch
};

static int device_attr(cudaDeviceAttr a) {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, a, dev) != cudaSuccess) return 0;
  return v;
}

template <typename T, int I, bool H>
static bool staged_kernel_built() {
  // The kernel body exists only when compiled for sm_90+; a build for an older
  // virtual arch (e.g. TORCH_CUDA_ARCH_LIST=8.0 JIT-compiled from PTX on an H100)
  // has an empty body, which must never be launched.
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, masked_ln_fwd_staged_kernel<T, kStagedVec, I, H>) != cudaSuccess) return false;
  return attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
}

static StagedConfig choose_staged(int dtype, int N, bool aligned, int stages, int bulk_y, int hold) {
  StagedConfig s;
  const int elt = dtype == 0 ? 4 : 2;
  if (!aligned || N <= 0 || N % kStagedVec != 0 || (N * elt) % 16 != 0) return s;
  if (device_attr(cudaDevAttrComputeCapabilityMajor) < 9) return s;
  const int nvec = N / kStagedVec;
  const int iters = (nvec + kStagedThreads - 1) / kStagedThreads;
  if (iters > 8) return s;
  if (stages <= 0) stages = kStagedDefaultStages;
  if (stages > kMaxStages) stages = kMaxStages;
  const int64_t room = (int64_t)device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin) - 1024;  // static smem
  const int64_t row = (int64_t)N * elt;
  if (stages < kStagedMinStages) stages = kStagedMinStages;
  if (stages * row > room) stages = (int)(room / row);
  if (stages < kStagedMinStages) return s;
  s.iters = iters;
  s.stages = stages;
  s.bulk_y = bulk_y;
  // Default (-1): hold x up to 4 vectors per thread (8192 bf16 columns); more spill.
  s.hold = hold < 0 ? iters <= 4 : hold != 0;
  s.threads = ((nvec + iters - 1) / iters + 31) / 32 * 32;
  return s;
}

struct FwdStagedLaunch {
  const StagedConfig& cfg; const void* x; void* y; const float *w, *b, *c; float *mean, *rstd;
  int64_t M; int N; float eps; int sm_count; cudaStream_t stream; bool query;
  template <typename T, int I> cudaError_t run() {
    return cfg.hold ? launch<T, I, true>() : launch<T, I, false>();
  }
  template <typename T, int I, bool H> cudaError_t launch() {
    if (!staged_kernel_built<T, I, H>()) return cudaErrorInvalidDeviceFunction;
    if (query) return cudaSuccess;
    auto k = masked_ln_fwd_staged_kernel<T, kStagedVec, I, H>;
    const int smem = cfg.stages * N * (int)sizeof(T);
    cudaError_t err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    // Persistent: as many blocks as fit on each SM (one at 10240: 94 registers x 512 threads), at most two.
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, cfg.threads, smem) != cudaSuccess || per_sm < 1)
      per_sm = 1;
    if (per_sm > 2) per_sm = 2;
    const int64_t slots = (int64_t)sm_count * per_sm;
    const int blocks = (int)(M < slots ? M : slots);
    cudaLaunchConfig_t lc = {};
    lc.gridDim = dim3(blocks);
    lc.blockDim = dim3(cfg.threads);
    lc.dynamicSmemBytes = smem;
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    lc.attrs = attr;
    lc.numAttrs = cfg.pdl ? 1 : 0;
    return cudaLaunchKernelEx(&lc, k, static_cast<const T*>(x), static_cast<T*>(y), w, b, c, mean, rstd, M, N, eps,
                              cfg.stages, cfg.bulk_y);
  }
};

template <typename F>
static cudaError_t dispatch_staged(int dtype, const StagedConfig& cfg, F&& f) {
#define MSG_STAGED_ITERS(T)                              \
  switch (cfg.iters) {                                   \
    case 1: return f.template run<T, 1>();               \
    case 2: return f.template run<T, 2>();               \
    case 3: return f.template run<T, 3>();               \
    case 4: return f.template run<T, 4>();               \
    case 5: return f.template run<T, 5>();               \
    case 6: return f.template run<T, 6>();               \
    case 7: return f.template run<T, 7>();               \
    case 8: return f.template run<T, 8>();               \
  }                                                      \
  return cudaErrorInvalidValue;
  if (dtype == 0) { MSG_STAGED_ITERS(float) }
  if (dtype == 1) { MSG_STAGED_ITERS(__half) }
  if (dtype == 2) { MSG_STAGED_ITERS(__nv_bfloat16) }
#undef MSG_STAGED_ITERS
  return cudaErrorInvalidValue;
}

struct BwdLaunch {
  const Config& cfg; const void *x, *dy; void* dx; const float *w, *c, *mean, *rstd; float *dw_part, *db_part;
  int64_t M; int N; int sm_count; cudaStream_t stream; int* owners_out; bool query;
  template <typename T, int V, int I, bool WR> cudaError_t run() {
    auto k = masked_ln_bwd_kernel<T, V, I, WR>;
    // Wide rows: fewer owners, so the fp32 partials stay small next to x.
    const int blocks = persistent_blocks(k, cfg, M, sm_count, N <= 2048 ? 8 : 2);
    *owners_out = blocks * rows_per_block(cfg);
    if (query) return cudaSuccess;
    k<<<blocks, cfg.threads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dx),
                                          w, c, mean, rstd, dw_part, db_part, M, N);
    return cudaGetLastError();
  }
};

}  // namespace msg

// C interface used by masked_layernorm_cuda.cpp -----------------------------

int msg_masked_ln_supported(int dtype, int N, int aligned) {
  const msg::Config cfg = msg::choose(dtype, N, aligned != 0);
  return cfg.threads > 0 && N > 0;
}

// Forward variants: 0 auto, 1 registers (a row per warp or block, in registers),
// 2 staged (sm_90 bulk copies into a shared-memory ring; `stages` buffers, 0 = default),
// 3 staged with y written back through the ring by bulk copies too.
// hold: the staged kernels keep x in registers (-1 default, 0 no, 1 yes);
// pdl: launch the staged kernels with programmatic dependent launch.
// auto takes variant 3 with the default ring for rows of kStagedAutoMinRowBytes
// and more where it can run: on the H100 it beat registers at every width from
// 4096 bf16 columns up (msg-bench kernel-sweep --cuda-only, docs/benchmarks.md),
// while narrower rows fit in registers with several rows in flight per SM.
constexpr int kStagedAutoMinRowBytes = 8192;

int msg_masked_ln_fwd_staged_supported(int dtype, int N, int aligned, int stages) {
  const msg::StagedConfig cfg = msg::choose_staged(dtype, N, aligned != 0, stages, 0, 0);
  if (cfg.threads <= 0) return 0;
  return msg::dispatch_staged(dtype, cfg,
                              msg::FwdStagedLaunch{cfg, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                   0, N, 0.f, 0, 0, true}) == cudaSuccess;
}

cudaError_t msg_masked_ln_fwd(int dtype, int aligned, const void* x, void* y, const float* w, const float* b,
                              const float* c, float* mean, float* rstd, int64_t M, int N, float eps,
                              int sm_count, cudaStream_t stream, int variant, int stages, int hold, int pdl) {
  const int elt = dtype == 0 ? 4 : 2;
  const bool staged = variant == 2 || variant == 3;
  if (staged || (variant == 0 && N * elt >= kStagedAutoMinRowBytes)) {
    msg::StagedConfig cfg = msg::choose_staged(dtype, N, aligned != 0, stages, variant != 2, hold);
    cfg.pdl = pdl;
    if (cfg.threads > 0) {
      const cudaError_t err = msg::dispatch_staged(
          dtype, cfg, msg::FwdStagedLaunch{cfg, x, y, w, b, c, mean, rstd, M, N, eps, sm_count, stream, false});
      // auto: a build without sm_90 code reports InvalidDeviceFunction before launching anything.
      if (staged || err != cudaErrorInvalidDeviceFunction) return err;
    } else if (staged) {
      return cudaErrorInvalidValue;
    }
  }
  const msg::Config cfg = msg::choose(dtype, N, aligned != 0);
  if (cfg.threads <= 0) return cudaErrorInvalidValue;
  return msg::dispatch(dtype, cfg, msg::FwdLaunch{cfg, x, y, w, b, c, mean, rstd, M, N, eps, sm_count, stream});
}

// With query != 0 only *owners is set (the rows of dw_part/db_part to allocate).
cudaError_t msg_masked_ln_bwd(int dtype, int aligned, const void* x, const void* dy, void* dx, const float* w,
                              const float* c, const float* mean, const float* rstd, float* dw_part,
                              float* db_part, int64_t M, int N, int sm_count, cudaStream_t stream, int* owners,
                              int query) {
  const msg::Config cfg = msg::choose(dtype, N, aligned != 0);
  if (cfg.threads <= 0) return cudaErrorInvalidValue;
  return msg::dispatch(dtype, cfg, msg::BwdLaunch{cfg, x, dy, dx, w, c, mean, rstd, dw_part, db_part, M, N, sm_count,
                                                  stream, owners, query != 0});
}
