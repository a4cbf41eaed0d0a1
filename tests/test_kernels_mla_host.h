// Host emulation of the CUDA features the MLA kernels use, so that cuda/mla_decode.cu and
// cuda/mla_attention.cu compile with a host C++ compiler and run, unchanged apart from their
// K2_HOST_EMULATION seams, on the CPU (tests/test_kernels_mla_host.py).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread, scheduled round robin;
// __syncthreads and the warp-collective operations are barriers that yield until every thread
// of the block (or warp) has arrived. Warp shuffles and mma.sync m16n8k16 exchange registers
// through per-warp buffers; the mma's operand and accumulator layouts follow the PTX ISA's
// description of the bf16 m16n8k16 fragments, written here independently of the kernels, so a
// kernel that loads a fragment wrongly computes the wrong product. cp.async copies are queued per
// thread in commit groups and performed only when cp.async.wait_group retires their group, so a
// kernel that reads shared memory before waiting (or before the barrier after the wait, when
// another thread's copies land later) reads stale data.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#define K2_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

using std::max;
using std::min;

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct float2 {
  float x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct k2dim3 {
  unsigned x, y, z;
};

inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline float __int_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even (no NaN inputs here)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return {static_cast<uint16_t>(bits >> 16)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<uint16_t>(bits >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16(lo), __float2bfloat16(hi)};
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

namespace k2emu {

inline k2dim3 thread_idx, block_idx, grid_dim, block_dim;
alignas(16) inline unsigned char dynamic_shared[256 * 1024];

struct Copy {
  void* dst;
  const void* src;  // null: zero-fill
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  std::vector<Copy> open;                 // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

inline ucontext_t scheduler_ctx;
inline std::vector<Fiber> fibers;
inline int current = 0;
inline std::function<void()> body;
inline int block_arrived = 0;
inline unsigned block_generation = 0;
inline int warp_arrived[32];
inline unsigned warp_generation[32];
inline float shuffle_buf[1024];
inline unsigned mma_a[1024][4];
inline unsigned mma_b[1024][2];

inline void yield() { swapcontext(&fibers[current].ctx, &scheduler_ctx); }

inline void block_barrier() {
  const unsigned gen = block_generation;
  if (++block_arrived == static_cast<int>(fibers.size())) {
    block_arrived = 0;
    ++block_generation;
    return;
  }
  while (block_generation == gen) yield();
}

inline void warp_barrier() {
  const int w = current / 32;
  const unsigned gen = warp_generation[w];
  if (++warp_arrived[w] == 32) {
    warp_arrived[w] = 0;
    ++warp_generation[w];
    return;
  }
  while (warp_generation[w] == gen) yield();
}

inline float shfl_xor(float v, int mask) {
  const int warp0 = current & ~31, lane = current & 31;
  shuffle_buf[current] = v;
  warp_barrier();
  const float got = shuffle_buf[warp0 + (lane ^ mask)];
  warp_barrier();
  return got;
}

inline float bf16_half(unsigned reg, int half) {
  return __bfloat162float({static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu)});
}

// PTX ISA, mma.m16n8k16 with .bf16 operands: groupID = lane >> 2, tig = lane % 4.
// A (16 x 16, row): reg0 = (row g, cols 2 tig, 2 tig + 1), reg1 = (row g + 8, same cols),
//                   reg2 = (row g, cols 2 tig + 8, + 9), reg3 = (row g + 8, cols + 8);
// B (16 x 8, col):  reg0 = (rows 2 tig, 2 tig + 1; col g), reg1 = (rows 2 tig + 8, + 9; col g);
// C/D (16 x 8):     d0, d1 = (row g, cols 2 tig, 2 tig + 1), d2, d3 = (row g + 8, same cols).
// The lower 16 bits of a register hold the element with the smaller index.
inline float a_elem(int warp0, int row, int k) {
  const int lane = (row % 8) * 4 + (k % 8) / 2;
  const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
  return bf16_half(mma_a[warp0 + lane][reg], k % 2);
}
inline float b_elem(int warp0, int k, int col) {
  const int lane = col * 4 + (k % 8) / 2;
  return bf16_half(mma_b[warp0 + lane][k >= 8 ? 1 : 0], k % 2);
}

inline void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
  const int warp0 = current & ~31, lane = current & 31;
  for (int i = 0; i < 4; ++i) mma_a[current][i] = a[i];
  mma_b[current][0] = b[0];
  mma_b[current][1] = b[1];
  warp_barrier();
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += a_elem(warp0, row, k) * b_elem(warp0, k, col);
    d[i] = acc;
  }
  warp_barrier();
}

inline void cp_async(void* dst, const void* src, bool valid) {
  fibers[current].open.push_back({dst, valid ? src : nullptr});
}

inline void cp_commit() {
  Fiber& f = fibers[current];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

// Complete all but the newest `pending` committed groups of this thread.
inline void cp_wait(int pending) {
  Fiber& f = fibers[current];
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const Copy& c : f.groups.front()) {
      if (c.src) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

inline void trampoline() {
  body();
  fibers[current].done = true;
  swapcontext(&fibers[current].ctx, &scheduler_ctx);
}

// Run `kernel` over the grid, one block after another, each block's threads as fibers.
inline void launch(k2dim3 grid, unsigned threads, const std::function<void()>& kernel) {
  grid_dim = grid;
  block_dim = {threads, 1, 1};
  body = kernel;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = {x, y, z};
        fibers.assign(threads, Fiber{});
        block_arrived = 0;
        std::fill(warp_arrived, warp_arrived + 32, 0);
        for (unsigned i = 0; i < threads; ++i) {
          Fiber& f = fibers[i];
          f.stack.resize(128 * 1024);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &scheduler_ctx;
          makecontext(&f.ctx, trampoline, 0);
        }
        bool running = true;
        while (running) {
          running = false;
          for (unsigned i = 0; i < threads; ++i) {
            if (fibers[i].done) continue;
            current = static_cast<int>(i);
            thread_idx = {i, 0, 0};
            swapcontext(&scheduler_ctx, &fibers[i].ctx);
            running = running || !fibers[i].done;
          }
        }
      }
}

}  // namespace k2emu

#define threadIdx (k2emu::thread_idx)
#define blockIdx (k2emu::block_idx)
#define gridDim (k2emu::grid_dim)
#define blockDim (k2emu::block_dim)
#define __syncthreads() k2emu::block_barrier()
#define __shfl_xor_sync(mask, v, m) k2emu::shfl_xor((v), (m))
