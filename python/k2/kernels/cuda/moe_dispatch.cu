// MoE dispatch and combine: route each token's k expert assignments into expert-contiguous rows
// and bring the expert outputs back.
//
// Terms: T tokens, k experts per token, N = T * k assignments (assignment a = t * k + s is slot s
// of token t), E experts, H hidden units per row.
//
//   moe_block_counts   expert histogram per chunk of 256 assignments        [nblk, E]
//   moe_offsets        per-expert totals (the histogram), exclusive offsets,
//                      and each chunk's starting row inside every expert      [E], [E+1], [nblk, E]
//   moe_positions      row of every assignment in expert-contiguous order (stable: within an
//                      expert, assignments keep their order) and its inverse   [N], [N]
//   moe_gather_rows    permute: rows[p] = x[token_of_row[p]] (also serves the backward of
//                      combine's y gradient when given weights)
//   moe_combine        out[t] = sum_s w[t, s] * y[pos[t * k + s]] (fp32 accumulation); with all
//                      weights 1 it is also the backward of permute
//   moe_combine_grad_w grad_w[t, s] = <grad_out[t], y[pos[t * k + s]]>
//
// Row kernels come in bf16 and fp32 flavours (suffix _bf16 / _f32). Experts with no tokens simply
// get an empty range. Indices are int64, as torch produces them.

#include <cuda_bf16.h>

namespace {

constexpr int CHUNK = 256;  // assignments per block in the counting kernels (= block size)

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16(v); }

// Stable rank of assignment `i` of this chunk among the chunk's assignments of the same expert.
__device__ __forceinline__ int rank_in_chunk(const int* experts, int i) {
  const int e = experts[i];
  int r = 0;
  for (int j = 0; j < i; ++j) r += (experts[j] == e);
  return r;
}

template <typename T>
__device__ void combine_rows(const T* __restrict__ y, const long long* __restrict__ pos,
                             const float* __restrict__ w, T* __restrict__ out, int T_, int k,
                             int H) {
  for (int t = blockIdx.x; t < T_; t += gridDim.x) {
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.0f;
      for (int s = 0; s < k; ++s) {
        const long long a = static_cast<long long>(t) * k + s;
        const float weight = w ? w[a] : 1.0f;
        acc += weight * to_f32(y[pos[a] * H + h]);
      }
      out[static_cast<long long>(t) * H + h] = from_f32<T>(acc);
    }
  }
}

template <typename T>
__device__ void gather_rows(const T* __restrict__ src, const long long* __restrict__ src_row,
                            const float* __restrict__ scale, T* __restrict__ dst, int n_rows,
                            int H) {
  for (int p = blockIdx.x; p < n_rows; p += gridDim.x) {
    const T* s = src + src_row[p] * H;
    T* d = dst + static_cast<long long>(p) * H;
    if (scale) {
      const float c = scale[p];
      for (int h = threadIdx.x; h < H; h += blockDim.x) d[h] = from_f32<T>(c * to_f32(s[h]));
    } else {
      for (int h = threadIdx.x; h < H; h += blockDim.x) d[h] = s[h];
    }
  }
}

// One warp per assignment: grad_w[a] = <grad_out[a / k], y[pos[a]]>.
template <typename T>
__device__ void combine_grad_w(const T* __restrict__ grad_out, const T* __restrict__ y,
                               const long long* __restrict__ pos, float* __restrict__ grad_w,
                               int N, int k, int H) {
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int a = blockIdx.x * warps + (threadIdx.x >> 5); a < N; a += gridDim.x * warps) {
    const T* g = grad_out + static_cast<long long>(a / k) * H;
    const T* v = y + pos[a] * H;
    float acc = 0.0f;
    for (int h = lane; h < H; h += 32) acc += to_f32(g[h]) * to_f32(v[h]);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) grad_w[a] = acc;
  }
}

}  // namespace

// counts[blk * E + e] = assignments of chunk blk routed to expert e. Block: CHUNK threads.
// An expert id outside [0, E) sets *bad = 1 and is not counted.
extern "C" __global__ void moe_block_counts(const long long* __restrict__ expert_of, int N, int E,
                                            int* __restrict__ counts, int* __restrict__ bad) {
  const int a = blockIdx.x * CHUNK + threadIdx.x;
  if (a >= N) return;
  const long long e = expert_of[a];
  if (e < 0 || e >= E) {
    *bad = 1;
    return;
  }
  atomicAdd(&counts[static_cast<long long>(blockIdx.x) * E + e], 1);
}

// From the per-chunk counts: tokens_per_expert[e], expert_offsets[0..E] (exclusive, last = N)
// and chunk_start[blk * E + e] = row of chunk blk's first assignment to e within expert e.
// Launch one block; threads stride over experts.
extern "C" __global__ void moe_offsets(const int* __restrict__ counts, int nblk, int E,
                                       long long* __restrict__ tokens_per_expert,
                                       long long* __restrict__ expert_offsets,
                                       int* __restrict__ chunk_start) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int b = 0; b < nblk; ++b) {
      chunk_start[static_cast<long long>(b) * E + e] = run;
      run += counts[static_cast<long long>(b) * E + e];
    }
    tokens_per_expert[e] = run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    long long run = 0;
    for (int e = 0; e < E; ++e) {
      expert_offsets[e] = run;
      run += tokens_per_expert[e];
    }
    expert_offsets[E] = run;
  }
}

// pos[a] = row of assignment a in expert-contiguous order; assignment_of_row[pos[a]] = a.
// Block: CHUNK threads, one chunk per block (same chunks as moe_block_counts).
extern "C" __global__ void moe_positions(const long long* __restrict__ expert_of, int N, int E,
                                         const long long* __restrict__ expert_offsets,
                                         const int* __restrict__ chunk_start,
                                         long long* __restrict__ pos,
                                         long long* __restrict__ assignment_of_row) {
  __shared__ int experts[CHUNK];
  const int i = threadIdx.x;
  const int a = blockIdx.x * CHUNK + i;
  experts[i] = a < N ? static_cast<int>(expert_of[a]) : -1;
  __syncthreads();
  if (a >= N) return;
  const int e = experts[i];
  const long long p = expert_offsets[e] +
                      chunk_start[static_cast<long long>(blockIdx.x) * E + e] +
                      rank_in_chunk(experts, i);
  pos[a] = p;
  assignment_of_row[p] = a;
}

// dst[p] = scale[p] * src[src_row[p]] (scale may be null): rows of H elements.
extern "C" __global__ void moe_gather_rows_bf16(const bf16* src, const long long* src_row,
                                                const float* scale, bf16* dst, int n_rows, int H) {
  gather_rows(src, src_row, scale, dst, n_rows, H);
}
extern "C" __global__ void moe_gather_rows_f32(const float* src, const long long* src_row,
                                               const float* scale, float* dst, int n_rows, int H) {
  gather_rows(src, src_row, scale, dst, n_rows, H);
}

// out[t] = sum_s w[t * k + s] * y[pos[t * k + s]] (w may be null: weights of 1).
extern "C" __global__ void moe_combine_bf16(const bf16* y, const long long* pos, const float* w,
                                            bf16* out, int T, int k, int H) {
  combine_rows(y, pos, w, out, T, k, H);
}
extern "C" __global__ void moe_combine_f32(const float* y, const long long* pos, const float* w,
                                           float* out, int T, int k, int H) {
  combine_rows(y, pos, w, out, T, k, H);
}

// grad_w[a] = <grad_out[a / k], y[pos[a]]>, one warp per assignment.
extern "C" __global__ void moe_combine_grad_w_bf16(const bf16* grad_out, const bf16* y,
                                                   const long long* pos, float* grad_w, int N,
                                                   int k, int H) {
  combine_grad_w(grad_out, y, pos, grad_w, N, k, H);
}
extern "C" __global__ void moe_combine_grad_w_f32(const float* grad_out, const float* y,
                                                  const long long* pos, float* grad_w, int N,
                                                  int k, int H) {
  combine_grad_w(grad_out, y, pos, grad_w, N, k, H);
}
