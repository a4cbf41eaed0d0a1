// MLA training attention, forward: causal softmax attention with document masking that also
// returns every head's largest scaled logit, the S_max QK-Clip reads (docs/kernels.md, "MLA").
//
// Terms: B sequences of T tokens (packed documents), H heads, Dk = qk_nope + qk_rope per head,
// Dv = v_head_dim. q, k [B, H, T, Dk] and v [B, H, T, Dv] are addressed through (b, h, t)
// strides in elements with a contiguous last dimension (the naive MLA path's expanded keys).
// doc_start [B, T] int32 is the first token of each query's document: query i may see key j iff
// doc_start[i] <= j <= i (block-diagonal causal). It is non-decreasing along t.
//
//   mla_attention_forward   out [B, H, T, Dv] bf16, lse [B, H, T] fp32 (natural log) and
//                           max_part [B, H, ceil(T / 64)]: the largest scale * q.k over the
//                           allowed pairs of each block's 64 queries (reduced by the launcher)
//
// Tiling (FlashAttention-2 style, 4 warps, 128 threads): a block owns 64 queries of one (b, h),
// each warp 16 of them, with the warp's query fragments in registers. Keys and values stream
// through shared memory 64 at a time, from the first tile of the block's first document up to
// the diagonal. Scores stay in registers: the running max and sum live with the threads that own
// the row, and the probabilities are repacked from the score accumulators straight into the A
// operand of the P V product (mma.sync m16n8k16, bf16 operands, fp32 accumulation). The max
// logit is taken from the fp32 scores before the softmax, over allowed pairs only.
// Requirements (checked by the launcher): Dk % 16 == 0, Dk <= 192, Dv % 8 == 0, Dv <= 128,
// strides multiples of 8 elements and 16-byte aligned bases.
//
// The K2_HOST_EMULATION branches (inline PTX and the shared-memory declaration only) let
// tests/test_kernels_mla_host.py compile and run this file on the CPU; NVRTC never defines it.

#ifndef K2_HOST_EMULATION  // tests/test_kernels_mla_host.h runs this file on the CPU
#include <cuda_bf16.h>
#endif

namespace {

typedef __nv_bfloat16 bf16;

constexpr int QTILE = 64;     // queries per block (16 per warp)
constexpr int KTILE = 64;     // keys per shared-memory tile
constexpr int THREADS = 128;
constexpr int DK_MAX = 192;
constexpr int DV_MAX = 128;
constexpr int KLD = DK_MAX + 8;  // padded shared rows: fragment loads are bank-conflict free
constexpr int VLD = DV_MAX + 8;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ unsigned pack_pair(const bf16* p) {
  return *reinterpret_cast<const unsigned*>(p);
}

__device__ __forceinline__ unsigned pack_two(bf16 lo, bf16 hi) {
  __nv_bfloat162 v;
  v.x = lo;
  v.y = hi;
  return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ unsigned pack_floats(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef K2_HOST_EMULATION
  k2emu::mma_16816(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// rows [key0, key0 + KTILE) x cols [0, dim) of a [T, dim] matrix with row stride `stride` into
// dst[KTILE][ld]; rows at or past T are zero.
__device__ __forceinline__ void load_tile(bf16* dst, int ld, const bf16* src, long long stride,
                                          int key0, int T, int dim) {
  const int chunks = dim >> 3;
  for (int i = threadIdx.x; i < KTILE * chunks; i += THREADS) {
    const int r = i / chunks, ch = i - r * chunks;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (key0 + r < T)
      val = *reinterpret_cast<const uint4*>(src + static_cast<long long>(key0 + r) * stride + ch * 8);
    *reinterpret_cast<uint4*>(dst + r * ld + ch * 8) = val;
  }
}

}  // namespace

// Grid (ceil(T / 64), H, B), THREADS threads, static shared memory only.
extern "C" __global__ void __launch_bounds__(THREADS)
mla_attention_forward(const bf16* __restrict__ q, long long q_sb, long long q_sh, long long q_st,
                      const bf16* __restrict__ k, long long k_sb, long long k_sh, long long k_st,
                      const bf16* __restrict__ v, long long v_sb, long long v_sh, long long v_st,
                      const int* __restrict__ doc_start, int H, int T, int Dk, int Dv,
                      float scale, bf16* __restrict__ out, float* __restrict__ lse,
                      float* __restrict__ max_part) {
  __shared__ __align__(16) bf16 Ks[KTILE * KLD];
  __shared__ __align__(16) bf16 Vs[KTILE * VLD];
  __shared__ float warp_max[THREADS / 32];

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int q0 = qb * QTILE;
  const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // the two query rows this thread holds
  const bf16* qh = q + b * q_sb + h * q_sh;
  const bf16* kh = k + b * k_sb + h * k_sh;
  const bf16* vh = v + b * v_sb + h * v_sh;
  const int* ds = doc_start + static_cast<long long>(b) * T;

  // The warp's query rows as mma A fragments (rows past T are zero).
  unsigned qf[DK_MAX / 16][4];
#pragma unroll
  for (int ks = 0; ks < DK_MAX / 16; ++ks) {
    qf[ks][0] = qf[ks][1] = qf[ks][2] = qf[ks][3] = 0u;
    if (ks * 16 < Dk) {
      const int col = ks * 16 + t4 * 2;
      if (r0 < T) {
        qf[ks][0] = pack_pair(qh + static_cast<long long>(r0) * q_st + col);
        qf[ks][2] = pack_pair(qh + static_cast<long long>(r0) * q_st + col + 8);
      }
      if (r1 < T) {
        qf[ks][1] = pack_pair(qh + static_cast<long long>(r1) * q_st + col);
        qf[ks][3] = pack_pair(qh + static_cast<long long>(r1) * q_st + col + 8);
      }
    }
  }
  const int ds0 = r0 < T ? ds[r0] : T, ds1 = r1 < T ? ds[r1] : T;

  const int kv_lo = ds[min(q0, T - 1)];  // the block's first document start
  const int kv_hi = min(T, q0 + QTILE);   // one past the block's last query
  const float scale_log2 = scale * LOG2E;

  float o[DV_MAX / 8][4];
#pragma unroll
  for (int nt = 0; nt < DV_MAX / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
  float m0 = neg_inf(), m1 = neg_inf(), l0 = 0.0f, l1 = 0.0f, mx = neg_inf();

  for (int kt = kv_lo / KTILE * KTILE; kt < kv_hi; kt += KTILE) {
    __syncthreads();  // the previous tile is no longer read
    load_tile(Ks, KLD, kh, k_st, kt, T, Dk);
    load_tile(Vs, VLD, vh, v_st, kt, T, Dv);
    __syncthreads();

    float s[KTILE / 8][4];
#pragma unroll
    for (int nt = 0; nt < KTILE / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < DK_MAX / 16; ++ks) {
      if (ks * 16 < Dk) {
#pragma unroll
        for (int nt = 0; nt < KTILE / 8; ++nt) {
          const bf16* kp = Ks + (nt * 8 + g) * KLD + ks * 16 + t4 * 2;
          const unsigned bb[2] = {pack_pair(kp), pack_pair(kp + 8)};
          mma_16816(s[nt], qf[ks], bb);
        }
      }
    }

    // Mask, max logit, and the online softmax of rows r0 (entries 0, 1) and r1 (2, 3).
    float tmax0 = neg_inf(), tmax1 = neg_inf();
#pragma unroll
    for (int nt = 0; nt < KTILE / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kt + nt * 8 + t4 * 2 + (e & 1);
        const int row = e < 2 ? r0 : r1;
        const int first = e < 2 ? ds0 : ds1;
        const bool allowed = row < T && key <= row && key >= first;
        const float x = s[nt][e] * scale;
        if (allowed) mx = fmaxf(mx, x);
        s[nt][e] = allowed ? s[nt][e] * scale_log2 : neg_inf();
      }
      tmax0 = fmaxf(tmax0, fmaxf(s[nt][0], s[nt][1]));
      tmax1 = fmaxf(tmax1, fmaxf(s[nt][2], s[nt][3]));
    }
    tmax0 = fmaxf(tmax0, __shfl_xor_sync(0xffffffffu, tmax0, 1));
    tmax0 = fmaxf(tmax0, __shfl_xor_sync(0xffffffffu, tmax0, 2));
    tmax1 = fmaxf(tmax1, __shfl_xor_sync(0xffffffffu, tmax1, 1));
    tmax1 = fmaxf(tmax1, __shfl_xor_sync(0xffffffffu, tmax1, 2));
    const float mn0 = fmaxf(m0, tmax0), mn1 = fmaxf(m1, tmax1);
    const float base0 = mn0 == neg_inf() ? 0.0f : mn0, base1 = mn1 == neg_inf() ? 0.0f : mn1;
    const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < KTILE / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - base0);
      s[nt][1] = exp2f(s[nt][1] - base0);
      s[nt][2] = exp2f(s[nt][2] - base1);
      s[nt][3] = exp2f(s[nt][3] - base1);
      ps0 += s[nt][0] + s[nt][1];
      ps1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * alpha0 + ps0;  // this thread's share; the row's 4 threads are summed at the end
    l1 = l1 * alpha1 + ps1;
#pragma unroll
    for (int nt = 0; nt < DV_MAX / 8; ++nt) {
      o[nt][0] *= alpha0;
      o[nt][1] *= alpha0;
      o[nt][2] *= alpha1;
      o[nt][3] *= alpha1;
    }

    // O += P V: the score accumulators of key n-tiles 2kk, 2kk + 1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < KTILE / 16; ++kk) {
      const unsigned a[4] = {pack_floats(s[2 * kk][0], s[2 * kk][1]),
                             pack_floats(s[2 * kk][2], s[2 * kk][3]),
                             pack_floats(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_floats(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nt = 0; nt < DV_MAX / 8; ++nt) {
        if (nt * 8 < Dv) {
          const bf16* vp = Vs + (kk * 16 + t4 * 2) * VLD + nt * 8 + g;
          const unsigned bb[2] = {pack_two(vp[0], vp[VLD]), pack_two(vp[8 * VLD], vp[9 * VLD])};
          mma_16816(o[nt], a, bb);
        }
      }
    }
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
  const long long head = static_cast<long long>(b) * H + h;
  bf16* oh = out + head * T * Dv;
#pragma unroll
  for (int nt = 0; nt < DV_MAX / 8; ++nt) {
    if (nt * 8 < Dv) {
      const int col = nt * 8 + t4 * 2;
      if (r0 < T)
        *reinterpret_cast<unsigned*>(oh + static_cast<long long>(r0) * Dv + col) =
            pack_floats(o[nt][0] * inv0, o[nt][1] * inv0);
      if (r1 < T)
        *reinterpret_cast<unsigned*>(oh + static_cast<long long>(r1) * Dv + col) =
            pack_floats(o[nt][2] * inv1, o[nt][3] * inv1);
    }
  }
  if (t4 == 0) {
    if (r0 < T) lse[head * T + r0] = l0 > 0.0f ? (m0 + log2f(l0)) * LN2 : neg_inf();
    if (r1 < T) lse[head * T + r1] = l1 > 0.0f ? (m1 + log2f(l1)) * LN2 : neg_inf();
  }

  // The block's max logit: warp shuffle, then across the 4 warps.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (lane == 0) warp_max[warp] = mx;
  __syncthreads();
  if (tid == 0) {
    float m = warp_max[0];
    for (int w = 1; w < THREADS / 32; ++w) m = fmaxf(m, warp_max[w]);
    max_part[head * gridDim.x + qb] = m;
  }
}
