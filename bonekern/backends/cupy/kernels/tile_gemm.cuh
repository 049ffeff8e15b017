// A shared-memory tiled SIMT GEMM main loop for the small-rank products of Bone and Bat (reduction length r, or K
// for the Bat block gradient). The large GEMMs (x W^T, dY W, dY^T x) go to cuBLAS through torch; these products
// are thin (one side has r columns), so a scalar FMA tile is fast enough and lets every operand be *computed*
// while it is loaded (mini's n % C repeat, Bat's "+ I", widening to the accumulation type).
//
// A block of Tile::kThreads (= bk::kBlockThreads) threads computes a BM x BN tile of acc = sum_k a(m, k) b(k, n);
// each thread owns TM x TN outputs: rows tm + i * (BM / TM), columns tn + j * (BN / TN) (strided, so a warp reads
// consecutive shared-memory words). Operand tiles are staged in shared memory BK deep; out-of-range elements load
// as zero, which also gives every kernel its bounds checks.
#pragma once

#include "common.cuh"

namespace bk {

template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct Tile {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
    static constexpr int kThreadsM = BM / TM, kThreadsN = BN / TN, kThreads = kThreadsM * kThreadsN;
    static_assert(kThreads == kBlockThreads, "every tile runs on one block of kBlockThreads threads");
};

// The tiles the kernels are instantiated for, named t<BM>x<BN> in kernel names; each kernel is built for the two
// tiles that suit its output shape (bonekern/backends/cupy/sources.py lists them).
using Tile32x32 = Tile<32, 32, 16, 2, 2>;
using Tile64x64 = Tile<64, 64, 16, 4, 4>;
using Tile128x16 = Tile<128, 16, 16, 8, 1>;

// The row and column of output (i, j) owned by this thread, relative to the tile origin.
template <class TileT>
__device__ __forceinline__ int tile_row(int i) {
    return static_cast<int>(threadIdx.x) / TileT::kThreadsN + i * TileT::kThreadsM;
}
template <class TileT>
__device__ __forceinline__ int tile_col(int j) {
    return static_cast<int>(threadIdx.x) % TileT::kThreadsN + j * TileT::kThreadsN;
}

// acc = 0: the start of every tile product (tile_gemm accumulates into acc).
template <class TileT, typename A>
__device__ __forceinline__ void zero_tile(A (&acc)[TileT::TM][TileT::TN]) {
#pragma unroll
    for (int i = 0; i < TileT::TM; ++i)
#pragma unroll
        for (int j = 0; j < TileT::TN; ++j) acc[i][j] = A(0);
}

// acc[i][j] += sum over k in [k_begin, k_end) of load_a(m, k) * load_b(k, n) for this thread's outputs of the tile at
// (m0, n0), with m < m_size and n < n_size. load_a / load_b are called only for in-range indices.
// kAContiguousInM: true when consecutive m of operand A are adjacent in memory (A stored transposed), so the
// staging loop walks m fastest and global loads stay coalesced; false when k is the contiguous direction.
// Every thread of the block must call this with the same k range (it synchronises the block).
template <class TileT, typename A, bool kAContiguousInM, class LoadA, class LoadB>
__device__ __forceinline__ void tile_gemm(A (&acc)[TileT::TM][TileT::TN], i64 m0, i64 n0, i64 m_size, i64 n_size,
                                          i64 k_begin, i64 k_end, const LoadA& load_a, const LoadB& load_b) {
    constexpr int BM = TileT::BM, BN = TileT::BN, BK = TileT::BK, TM = TileT::TM, TN = TileT::TN;
    __shared__ A a_tile[BK][BM + 1];  // +1: the transposed staging writes of the k-contiguous case avoid conflicts
    __shared__ A b_tile[BK][BN];
    const int tid = static_cast<int>(threadIdx.x);
    for (i64 k0 = k_begin; k0 < k_end; k0 += BK) {
        for (int idx = tid; idx < BM * BK; idx += TileT::kThreads) {
            const int mm = kAContiguousInM ? idx % BM : idx / BK;
            const int kk = kAContiguousInM ? idx / BM : idx % BK;
            const i64 m = m0 + mm, k = k0 + kk;
            a_tile[kk][mm] = (m < m_size && k < k_end) ? load_a(m, k) : A(0);
        }
        for (int idx = tid; idx < BN * BK; idx += TileT::kThreads) {
            const int nn = idx % BN, kk = idx / BN;
            const i64 n = n0 + nn, k = k0 + kk;
            b_tile[kk][nn] = (n < n_size && k < k_end) ? load_b(k, n) : A(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            A a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = a_tile[kk][tile_row<TileT>(i)];
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = b_tile[kk][tile_col<TileT>(j)];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
}

// Splits blockIdx.x into (batch, tile row, tile column) for a grid of batches x tiles_m x tiles_n tiles.
struct TileIndex {
    i64 batch, m0, n0;
};
template <class TileT>
__device__ __forceinline__ TileIndex tile_index(i64 m_size, i64 n_size) {
    const i64 tiles_n = (n_size + TileT::BN - 1) / TileT::BN;
    const i64 tiles_m = (m_size + TileT::BM - 1) / TileT::BM;
    const i64 t = static_cast<i64>(blockIdx.x);
    TileIndex out;
    out.batch = t / (tiles_m * tiles_n);
    const i64 rest = t - out.batch * tiles_m * tiles_n;
    out.m0 = (rest / tiles_n) * TileT::BM;
    out.n0 = (rest % tiles_n) * TileT::BN;
    return out;
}

}  // namespace bk
