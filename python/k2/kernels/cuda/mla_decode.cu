// MLA decode in the absorbed form: a few new query tokens per sequence attend over the sequence's
// cached latent c [keys, R] and rotary key k_pe [keys, P] (docs/kernels.md, "MLA").
//
// Terms: B sequences, T new tokens per sequence, H heads, M = T * H query rows per sequence (row
// r = t * H + h, the order of a contiguous [B, T, H, D] query), R kv_lora_rank, P rope dim,
// D = R + P. A query row is [q_nope W_uk (R numbers), q_pe (P numbers)]; its key j is
// [c_j, k_pe_j] and its value is c_j, shared by every head.
//
// Cache layout: sequence b owns rows [start_b, end_b) of its slice of the cache (element (b, j, x)
// at c[b * c_bstride + j * c_rstride + x], likewise k_pe). That covers the model's KVCache
// (start 0, end = length), left-padded prompts and the rollout engine's right-aligned slots
// (start = first valid column). New token t of sequence b sees keys [start_b, end_b - (T-1-t)).
//
//   mla_decode_partial   flash-decoding split: block (split, row group, b) runs an online softmax
//                        over its share of the sequence's keys for 64 query rows and writes the
//                        normalized partial output [R] and its log-sum-exp per row
//   mla_decode_combine   merges the splits of every row: out = sum_s exp(lse_s - lse) o_s
//
// Tiling of mla_decode_partial (8 warps, 256 threads): the 64 x D query tile stays in shared
// memory; keys stream through a double-buffered 32 x D tile (cp.async). Per tile:
//   scores  S[64, 32] = Q K^T      warp w: rows 16 (w % 4) .. +16, keys 16 (w / 4) .. +16
//   softmax                        4 threads per row, 8 keys each, running max and sum in
//                                  registers (exp2 of log2e-scaled scores)
//   output  O[64, R] += P C        warp w owns latent columns [w R / 8, (w + 1) R / 8) for all
//                                  64 rows: the whole accumulator lives in registers
// bf16 operands, fp32 accumulation (mma.sync m16n8k16), bf16 probabilities as in PyTorch's
// reference (probs.to(bf16) @ c). Requirements (checked by the launcher): R % 64 == 0,
// R <= 512, P % 16 == 0, 16-byte aligned rows.
//
// The K2_HOST_EMULATION branches (inline PTX and the shared-memory declaration only) let
// tests/test_kernels_mla_host.py compile and run this file on the CPU; NVRTC never defines it.

#ifndef K2_HOST_EMULATION  // tests/test_kernels_mla_host.h runs this file on the CPU
#include <cuda_bf16.h>
#endif

namespace {

typedef __nv_bfloat16 bf16;

constexpr int ROWS = 64;      // query rows per block
constexpr int KEYS = 32;      // keys per tile
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int PAD = 8;        // bf16 padding per shared row (bank-conflict-free fragments)
constexpr int SLD = KEYS + 4; // fp32 score row
constexpr int PLD = KEYS + PAD;
constexpr int MAX_NT = 8;     // latent n-tiles (8 columns) per warp: R <= 8 * 8 * WARPS = 512
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

// D = A(16x16, row) * B(16x8, col) + D, bf16 inputs, fp32 accumulators.
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

// 16 bytes global -> shared, asynchronously; with valid == false the destination is zeroed and
// nothing is read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef K2_HOST_EMULATION
  k2emu::cp_async(smem, gmem, valid);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef K2_HOST_EMULATION
  k2emu::cp_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef K2_HOST_EMULATION
  k2emu::cp_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Keys [key0, key0 + KEYS) of one sequence into ks[KEYS][D + PAD]: c in columns [0, R), k_pe in
// [R, D). Keys at or past key_end are zero-filled (never read).
__device__ __forceinline__ void load_keys(bf16* ks, const bf16* c, long long c_rstride,
                                          const bf16* kpe, long long kpe_rstride, int key0,
                                          int key_end, int R, int P) {
  const int LD = R + P + PAD;
  const int cr = R >> 3, chunks = (R + P) >> 3;
  for (int i = threadIdx.x; i < KEYS * chunks; i += THREADS) {
    const int r = i / chunks, ch = i - r * chunks;
    const long long key = key0 + r;
    const bool valid = key < key_end;
    const bf16* src = ch < cr ? c + key * c_rstride + ch * 8 : kpe + key * kpe_rstride + (ch - cr) * 8;
    cp_async16(ks + r * LD + ch * 8, valid ? src : c, valid);
  }
}

}  // namespace

// One split of one sequence for 64 query rows. Grid (splits, ceil(M / 64), B), THREADS threads,
// dynamic shared memory as computed by the launcher (mla_decode.py: _partial_smem_bytes).
// o_part [B, splits, M, R] fp32 (normalized within the split), lse_part [B, splits, M] fp32
// (natural log; -inf where the split holds no key of the row).
extern "C" __global__ void __launch_bounds__(THREADS, 1)
mla_decode_partial(const bf16* __restrict__ q, long long q_bstride, int M, int heads, int T,
                   const bf16* __restrict__ c, long long c_bstride, long long c_rstride,
                   const bf16* __restrict__ kpe, long long kpe_bstride, long long kpe_rstride,
                   const int* __restrict__ starts, const int* __restrict__ ends, int R, int P,
                   float scale, int splits, float* __restrict__ o_part,
                   float* __restrict__ lse_part) {
#ifdef K2_HOST_EMULATION
  unsigned char* smem = k2emu::dynamic_shared;
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  const int D = R + P, LD = D + PAD;
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Ks = Qs + ROWS * LD;
  float* Ss = reinterpret_cast<float*>(Ks + 2 * KEYS * LD);
  bf16* Ps = reinterpret_cast<bf16*>(Ss + ROWS * SLD);
  float* alpha_s = reinterpret_cast<float*>(Ps + ROWS * PLD);
  float* l_s = alpha_s + ROWS;

  const int split = blockIdx.x, row0 = blockIdx.y * ROWS, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const bf16* cb = c + b * c_bstride;
  const bf16* kb_ = kpe + b * kpe_bstride;

  // This split's keys: the sequence's range cut into `splits` chunks of whole tiles.
  const int start = starts[b], end = ends[b];
  const int len = end - start;
  const int chunk = ((len + splits - 1) / splits + KEYS - 1) / KEYS * KEYS;
  const int kbeg = start + split * chunk;
  const int kend = min(end, kbeg + chunk);
  const int ntiles = kend > kbeg ? (kend - kbeg + KEYS - 1) / KEYS : 0;

  // Softmax ownership: 4 consecutive threads per row, 8 keys each.
  const int srow = tid >> 2, spart = tid & 3;
  const int grow = row0 + srow;
  const int row_end = grow < M ? min(kend, end - (T - 1 - grow / heads)) : kbeg;
  const float scale_log2 = scale * LOG2E;
  float m_run = neg_inf(), l_run = 0.0f;

  const int ncols = R / WARPS, nt_count = ncols / 8, col0 = warp * ncols;
  float o[4][MAX_NT][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < MAX_NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][nt][e] = 0.0f;

  // The query tile (rows past M are zero) and the first key tile, in one async group.
  {
    const bf16* qb = q + b * q_bstride;
    const int chunks = D >> 3;
    for (int i = tid; i < ROWS * chunks; i += THREADS) {
      const int r = i / chunks, ch = i - r * chunks;
      const bool valid = row0 + r < M;
      cp_async16(Qs + r * LD + ch * 8, valid ? qb + static_cast<long long>(row0 + r) * D + ch * 8 : qb,
                 valid);
    }
  }
  if (ntiles > 0) load_keys(Ks, cb, c_rstride, kb_, kpe_rstride, kbeg, kend, R, P);
  cp_async_commit();

  for (int it = 0; it < ntiles; ++it) {
    const bf16* Kc = Ks + (it & 1) * KEYS * LD;
    const int key0 = kbeg + it * KEYS;
    if (it + 1 < ntiles)
      load_keys(Ks + ((it + 1) & 1) * KEYS * LD, cb, c_rstride, kb_, kpe_rstride, key0 + KEYS,
                kend, R, P);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch just issued has landed
    __syncthreads();

    // Scores: warp w computes rows [16 mt, 16 mt + 16) x keys [16 nh, 16 nh + 16).
    {
      const int mt = warp & 3, nb = (warp >> 2) * 2;
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      for (int k = 0; k < D; k += 16) {
        const bf16* qa = Qs + (mt * 16 + g) * LD + k + t4 * 2;
        const unsigned a[4] = {pack_pair(qa), pack_pair(qa + 8 * LD), pack_pair(qa + 8),
                               pack_pair(qa + 8 * LD + 8)};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const bf16* kp = Kc + ((nb + j) * 8 + g) * LD + k + t4 * 2;
          const unsigned bb[2] = {pack_pair(kp), pack_pair(kp + 8)};
          mma_16816(s[j], a, bb);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = (nb + j) * 8 + t4 * 2, r = mt * 16 + g;
        Ss[r * SLD + col] = s[j][0];
        Ss[r * SLD + col + 1] = s[j][1];
        Ss[(r + 8) * SLD + col] = s[j][2];
        Ss[(r + 8) * SLD + col + 1] = s[j][3];
      }
    }
    __syncthreads();

    // Online softmax of this tile, row by row.
    {
      float v[8];
      float tmax = neg_inf();
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int col = spart * 8 + i;
        v[i] = key0 + col < row_end ? Ss[srow * SLD + col] * scale_log2 : neg_inf();
        tmax = fmaxf(tmax, v[i]);
      }
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
      tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
      const float m_new = fmaxf(m_run, tmax);
      const float base = m_new == neg_inf() ? 0.0f : m_new;
      const float alpha = exp2f(m_run - base);  // 0 while nothing was seen (m_run = -inf)
      float psum = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float p = exp2f(v[i] - base);
        Ps[srow * PLD + spart * 8 + i] = __float2bfloat16(p);
        psum += p;
      }
      psum += __shfl_xor_sync(0xffffffffu, psum, 1);
      psum += __shfl_xor_sync(0xffffffffu, psum, 2);
      l_run = l_run * alpha + psum;
      m_run = m_new;
      if (spart == 0) alpha_s[srow] = alpha;
    }
    __syncthreads();

    // O = alpha O + P C over this warp's latent columns.
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      const float a0 = alpha_s[mt * 16 + g], a1 = alpha_s[mt * 16 + g + 8];
#pragma unroll
      for (int nt = 0; nt < MAX_NT; ++nt) {
        if (nt < nt_count) {
          o[mt][nt][0] *= a0;
          o[mt][nt][1] *= a0;
          o[mt][nt][2] *= a1;
          o[mt][nt][3] *= a1;
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < KEYS; kk += 16) {
      unsigned a[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const bf16* pa = Ps + (mt * 16 + g) * PLD + kk + t4 * 2;
        a[mt][0] = pack_pair(pa);
        a[mt][1] = pack_pair(pa + 8 * PLD);
        a[mt][2] = pack_pair(pa + 8);
        a[mt][3] = pack_pair(pa + 8 * PLD + 8);
      }
#pragma unroll
      for (int nt = 0; nt < MAX_NT; ++nt) {
        if (nt < nt_count) {
          const bf16* vb = Kc + (kk + t4 * 2) * LD + col0 + nt * 8 + g;
          const unsigned bb[2] = {pack_two(vb[0], vb[LD]), pack_two(vb[8 * LD], vb[9 * LD])};
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) mma_16816(o[mt][nt], a[mt], bb);
        }
      }
    }
    __syncthreads();  // the next iteration overwrites Ss, Ps and this key buffer
  }
  cp_async_wait<0>();

  if (spart == 0) {
    l_s[srow] = l_run;
    if (grow < M)
      lse_part[(static_cast<long long>(b) * splits + split) * M + grow] =
          l_run > 0.0f ? (m_run + log2f(l_run)) * LN2 : neg_inf();
  }
  __syncthreads();

  float* op = o_part + (static_cast<long long>(b) * splits + split) * M * R;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    const int r0 = mt * 16 + g, r1 = r0 + 8;
    const float l0 = l_s[r0], l1 = l_s[r1];
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int nt = 0; nt < MAX_NT; ++nt) {
      if (nt < nt_count) {
        const int col = col0 + nt * 8 + t4 * 2;
        if (row0 + r0 < M)
          *reinterpret_cast<float2*>(op + static_cast<long long>(row0 + r0) * R + col) =
              make_float2(o[mt][nt][0] * inv0, o[mt][nt][1] * inv0);
        if (row0 + r1 < M)
          *reinterpret_cast<float2*>(op + static_cast<long long>(row0 + r1) * R + col) =
              make_float2(o[mt][nt][2] * inv1, o[mt][nt][3] * inv1);
      }
    }
  }
}

// Merge the splits. Grid (M, B), any block size. out [B, M, R] bf16, lse [B, M] fp32.
extern "C" __global__ void mla_decode_combine(const float* __restrict__ o_part,
                                              const float* __restrict__ lse_part, int M, int R,
                                              int splits, bf16* __restrict__ out,
                                              float* __restrict__ lse) {
  const int row = blockIdx.x, b = blockIdx.y;
  const float* ls = lse_part + static_cast<long long>(b) * splits * M + row;
  float mx = neg_inf();
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ls[static_cast<long long>(s) * M]);
  const float base = mx == neg_inf() ? 0.0f : mx;
  float wsum = 0.0f;
  for (int s = 0; s < splits; ++s) wsum += __expf(ls[static_cast<long long>(s) * M] - base);
  const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
  const float* ob = o_part + (static_cast<long long>(b) * splits * M + row) * R;
  bf16* dst = out + (static_cast<long long>(b) * M + row) * R;
  for (int col = threadIdx.x; col < R; col += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float w = __expf(ls[static_cast<long long>(s) * M] - base);
      if (w > 0.0f) acc += w * ob[static_cast<long long>(s) * M * R + col];
    }
    dst[col] = __float2bfloat16(acc * inv);
  }
  if (threadIdx.x == 0)
    lse[static_cast<long long>(b) * M + row] = wsum > 0.0f ? base + __logf(wsum) : neg_inf();
}
