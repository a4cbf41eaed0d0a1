// Newton–Schulz orthogonalization for Muon: the two bf16 tensor-core products of one iteration.
//
// One iteration on X (m x n, m <= n after the launcher's transpose-by-strides) is
//     A = X Xᵀ            (m x m, symmetric)          ns_syrk with Y = null
//     B = b A + c A Aᵀ    (A is symmetric: A A = A Aᵀ)  ns_syrk with Y = A
//     X = a X + B X                                    ns_gemm
// ns_syrk computes only the tiles on and below the diagonal of its symmetric result and writes
// each off-diagonal tile twice (as itself and mirrored), so the two symmetric products cost half
// of a general GEMM. Inputs and outputs are bf16, accumulation is fp32 (mma.sync m16n8k16).
//
// Layout conventions: every matrix operand is addressed through (batch, row, column) strides in
// elements, so a transposed view needs no copy. Batches run along blockIdx.z.
//
// Tiling: a 64 x 64 output tile per block of 128 threads (4 warps as 2 x 2, each warp 32 x 32 =
// 2 x 4 mma tiles of 16 x 8), K advanced 32 at a time through shared memory. The tensor-core
// instruction is written as inline PTX, so the file needs no header beyond cuda_bf16.h.

#include <cuda_bf16.h>

namespace {

constexpr int TILE = 64;      // output tile edge
constexpr int KTILE = 32;     // K slice staged in shared memory per step
constexpr int KPAD = KTILE + 8;  // padded row (bf16 elements) against bank conflicts
constexpr int THREADS = 128;

typedef __nv_bfloat16 bf16;

// Shared-memory staging of one K slice: rows of the A operand and rows of the (transposed) B
// operand, both stored [row][k] so that mma fragments are pairs of consecutive k.
struct Stage {
  bf16 a[TILE][KPAD];
  bf16 b[TILE][KPAD];
};

__device__ __forceinline__ unsigned pack_pair(const bf16* p) {
  return *reinterpret_cast<const unsigned*>(p);
}

// D = A(16x16, row) * B(16x8, col) + D, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copy a TILE x KTILE block of a strided matrix into dst[r][k]; rows/cols past the edge are zero.
// Element (r, k) of the block is src[(row0 + r) * s_row + (k0 + k) * s_col].
__device__ __forceinline__ void load_block(bf16 (*dst)[KPAD], const bf16* src, long long s_row,
                                           long long s_col, int row0, int rows, int k0, int ks) {
  const bf16 zero = __float2bfloat16(0.0f);
  for (int idx = threadIdx.x; idx < TILE * KTILE; idx += THREADS) {
    // Walk along whichever index is contiguous in memory so global reads coalesce.
    int r, k;
    if (s_col == 1) {
      r = idx / KTILE;
      k = idx % KTILE;
    } else {
      k = idx / TILE;
      r = idx % TILE;
    }
    const int gr = row0 + r, gk = k0 + k;
    dst[r][k] = (gr < rows && gk < ks) ? src[gr * s_row + gk * s_col] : zero;
  }
}

// Accumulate one staged K slice into this warp's 32 x 32 sub-tile.
__device__ __forceinline__ void mma_stage(const Stage& s, float acc[2][4][4], int warp_m,
                                          int warp_n, int lane) {
  const int g = lane >> 2;   // groupID
  const int q = lane & 3;    // thread in group
#pragma unroll
  for (int kk = 0; kk < KTILE; kk += 16) {
    unsigned af[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = warp_m * 32 + i * 16 + g;
      af[i][0] = pack_pair(&s.a[r][kk + q * 2]);
      af[i][1] = pack_pair(&s.a[r + 8][kk + q * 2]);
      af[i][2] = pack_pair(&s.a[r][kk + q * 2 + 8]);
      af[i][3] = pack_pair(&s.a[r + 8][kk + q * 2 + 8]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = warp_n * 32 + j * 8 + g;
      unsigned bfrag[2];
      bfrag[0] = pack_pair(&s.b[c][kk + q * 2]);
      bfrag[1] = pack_pair(&s.b[c][kk + q * 2 + 8]);
#pragma unroll
      for (int i = 0; i < 2; ++i) mma_16816(acc[i][j], af[i], bfrag);
    }
  }
}

// Visit the accumulator elements of this thread: f(row_in_tile, col_in_tile, value).
template <typename F>
__device__ __forceinline__ void for_each_acc(const float acc[2][4][4], int warp_m, int warp_n,
                                             int lane, F f) {
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = warp_m * 32 + i * 16 + g + (e >= 2 ? 8 : 0);
        const int c = warp_n * 32 + j * 8 + q * 2 + (e & 1);
        f(r, c, acc[i][j][e]);
      }
}

// Lower-triangular tile index t -> (ti, tj) with ti >= tj, t = ti (ti + 1) / 2 + tj.
__device__ __forceinline__ void tri_tile(int t, int& ti, int& tj) {
  int i = static_cast<int>((sqrtf(8.0f * t + 1.0f) - 1.0f) * 0.5f);
  while ((i + 1) * (i + 2) / 2 <= t) ++i;
  while (i * (i + 1) / 2 > t) --i;
  ti = i;
  tj = t - i * (i + 1) / 2;
}

}  // namespace

// C = alpha * X Xᵀ + beta * Y for each batch b, computing lower tiles only.
//   X: [batch] m x k, element (r, c) at X[b * sx_b + r * sx_r + c * sx_c]
//   Y: [batch] m x m contiguous and symmetric, or null (then beta is ignored)
//   C: [batch] m x m contiguous (must not alias X or Y)
// Grid: (T (T + 1) / 2, 1, batch) with T = ceil(m / 64); block: 128 threads.
extern "C" __global__ void __launch_bounds__(THREADS)
ns_syrk(const bf16* __restrict__ X, const bf16* __restrict__ Y, bf16* __restrict__ C, int m,
        int k, long long sx_b, long long sx_r, long long sx_c, float alpha, float beta) {
  __shared__ Stage stage;
  int ti, tj;
  tri_tile(blockIdx.x, ti, tj);
  const long long b = blockIdx.z;
  const bf16* xb = X + b * sx_b;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp >> 1, warp_n = warp & 1;

  float acc[2][4][4] = {};
  for (int k0 = 0; k0 < k; k0 += KTILE) {
    load_block(stage.a, xb, sx_r, sx_c, ti * TILE, m, k0, k);
    load_block(stage.b, xb, sx_r, sx_c, tj * TILE, m, k0, k);
    __syncthreads();
    mma_stage(stage, acc, warp_m, warp_n, lane);
    __syncthreads();
  }

  const long long mm = static_cast<long long>(m) * m;
  bf16* cb = C + b * mm;
  const bf16* yb = Y ? Y + b * mm : nullptr;
  for_each_acc(acc, warp_m, warp_n, lane, [&](int r, int c, float v) {
    const int gi = ti * TILE + r, gj = tj * TILE + c;
    if (gi >= m || gj >= m) return;
    float out = alpha * v;
    if (yb) out += beta * __bfloat162float(yb[static_cast<long long>(gi) * m + gj]);
    const bf16 o = __float2bfloat16(out);
    cb[static_cast<long long>(gi) * m + gj] = o;
    if (ti != tj) cb[static_cast<long long>(gj) * m + gi] = o;  // the mirrored tile
  });
}

// Out = a * X + B X for each batch b.
//   B: [batch] m x m contiguous (symmetric in Newton–Schulz, but any matrix works)
//   X: [batch] m x n, element (r, c) at X[b * sx_b + r * sx_r + c * sx_c]
//   Out: same shape and strides as X (must not alias X or B)
// Grid: (ceil(n / 64), ceil(m / 64), batch); block: 128 threads.
extern "C" __global__ void __launch_bounds__(THREADS)
ns_gemm(const bf16* __restrict__ B, const bf16* __restrict__ X, bf16* __restrict__ Out, int m,
        int n, long long sx_b, long long sx_r, long long sx_c, float a) {
  __shared__ Stage stage;
  const int tn = blockIdx.x, tm = blockIdx.y;
  const long long b = blockIdx.z;
  const bf16* bb = B + b * static_cast<long long>(m) * m;
  const bf16* xb = X + b * sx_b;
  bf16* ob = Out + b * sx_b;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp >> 1, warp_n = warp & 1;

  float acc[2][4][4] = {};
  for (int k0 = 0; k0 < m; k0 += KTILE) {
    // A operand: rows tm*64.. of B, k along B's columns.
    load_block(stage.a, bb, m, 1, tm * TILE, m, k0, m);
    // B operand staged [col][k]: element (c, kk) = X[k0 + kk][tn*64 + c], i.e. Xᵀ by strides.
    load_block(stage.b, xb, sx_c, sx_r, tn * TILE, n, k0, m);
    __syncthreads();
    mma_stage(stage, acc, warp_m, warp_n, lane);
    __syncthreads();
  }

  for_each_acc(acc, warp_m, warp_n, lane, [&](int r, int c, float v) {
    const int gi = tm * TILE + r, gj = tn * TILE + c;
    if (gi >= m || gj >= n) return;
    const long long off = gi * sx_r + gj * sx_c;
    ob[off] = __float2bfloat16(v + a * __bfloat162float(xb[off]));
  });
}
