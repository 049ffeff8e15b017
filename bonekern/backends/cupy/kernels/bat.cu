// Bat kernels, for a run of `blocks` consecutive out-blocks (a chunk of r * blocks rows of W):
//
//   bk_bat_weight:      W'_ij = W_ij B_i + W_ij + B_i                      (stored in W's type, computed in A)
//   bk_bat_block_grad:  sum_j W_ij^T G_ij, one partial sum per split of the reduction (rows u of the view below)
//
// The host adds the identity part of dB_i = sum_j (W_ij + I)^T G_ij, sum_j G_ij = dY_i^T S(x), as a rank-r GEMM.
// Both kernels keep the reference's term structure (W B + W + B; W^T G + sum G), so non-finite inputs give the
// same Inf / NaN pattern as the einsum reference.
//
// Both use the free view of out-block i's rows as a (K, r) matrix: for W rows i*r .. i*r + r - 1 (contiguous, row
// length K), element [u, s] with u = p * (K / r) + j is W[i*r + p, j*r + s]. Then
//   W'_i (K, r) = Z_i B_i + Z_i + B_i[p(u), :]      with Z_i the view of W, p(u) = u / (K / r),
//   W-part of dB_i (r, r) = Z_i^T Gz_i               with Gz_i the same view of G = dY^T x,
// i.e. two thin GEMMs with reduction length r and K.
#include "tile_gemm.cuh"

namespace bk {

// out, w: (blocks * r, K) contiguous; b: (blocks, r, r) contiguous in A. Grid: blocks * tiles(K, BM) * tiles(r, BN).
template <typename T, typename A, class TileT>
__device__ __forceinline__ void bat_weight(T* __restrict__ out, const T* __restrict__ w, const A* __restrict__ b,
                                           i64 k_size, i64 r) {
    BK_CHECK(blockDim.x == TileT::kThreads && blockDim.y == 1 && blockDim.z == 1);
    const TileIndex t = tile_index<TileT>(k_size, r);
    const i64 groups = k_size / r;
    const T* z = w + t.batch * r * k_size;
    const A* b_i = b + t.batch * r * r;
    A acc[TileT::TM][TileT::TN];
    zero_tile<TileT>(acc);
    tile_gemm<TileT, A, false>(
        acc, t.m0, t.n0, k_size, r, 0, r, [=](i64 u, i64 s) { return widen<A>(z[u * r + s]); },
        [=](i64 s, i64 q) { return b_i[s * r + q]; });
    T* o = out + t.batch * r * k_size;
#pragma unroll
    for (int i = 0; i < TileT::TM; ++i) {
        const i64 u = t.m0 + tile_row<TileT>(i);
        if (u >= k_size) continue;
        const i64 p = u / groups;
#pragma unroll
        for (int j = 0; j < TileT::TN; ++j) {
            const i64 q = t.n0 + tile_col<TileT>(j);
            if (q < r) o[u * r + q] = narrow<T>(acc[i][j] + widen<A>(z[u * r + q]) + b_i[p * r + q]);
        }
    }
}

// partial: (splits, blocks, r, r) in A, split = blockIdx.y summing u in [split * k_per_split, ... + k_per_split).
// g: (blocks * r, K) contiguous in A (rows of dY^T x for these out-blocks); w: (blocks * r, K) contiguous.
// Grid: (blocks * tiles(r, BM) * tiles(r, BN), splits).
template <typename T, typename A, class TileT>
__device__ __forceinline__ void bat_block_grad(A* __restrict__ partial, const A* __restrict__ g,
                                               const T* __restrict__ w, i64 blocks, i64 k_size, i64 r,
                                               i64 k_per_split) {
    BK_CHECK(blockDim.x == TileT::kThreads && blockDim.y == 1 && blockDim.z == 1);
    const TileIndex t = tile_index<TileT>(r, r);
    const i64 split = static_cast<i64>(blockIdx.y);
    const i64 u_begin = split * k_per_split;
    const i64 u_end = u_begin + k_per_split < k_size ? u_begin + k_per_split : k_size;
    const T* z = w + t.batch * r * k_size;
    const A* gz = g + t.batch * r * k_size;
    A acc[TileT::TM][TileT::TN];
    zero_tile<TileT>(acc);
    // A operand: W_i^T, i.e. a(s, u) = Z_i[u, s] (stored transposed: consecutive s are adjacent).
    tile_gemm<TileT, A, true>(
        acc, t.m0, t.n0, r, r, u_begin, u_end, [=](i64 s, i64 u) { return widen<A>(z[u * r + s]); },
        [=](i64 u, i64 q) { return gz[u * r + q]; });
    A* out = partial + (split * blocks + t.batch) * r * r;
#pragma unroll
    for (int i = 0; i < TileT::TM; ++i) {
        const i64 s = t.m0 + tile_row<TileT>(i);
#pragma unroll
        for (int j = 0; j < TileT::TN; ++j) {
            const i64 q = t.n0 + tile_col<TileT>(j);
            if (s < r && q < r) out[s * r + q] = acc[i][j];
        }
    }
}

}  // namespace bk

#define BK_BAT_WEIGHT_KERNEL(TILE_NAME, TILE, SUF, T, A)                                               \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)               \
        bk_bat_weight_##SUF##_##TILE_NAME(T* out, const T* w, const A* b, bk::i64 k_size, bk::i64 r) { \
        bk::bat_weight<T, A, TILE>(out, w, b, k_size, r);                                              \
    }

#define BK_BAT_BLOCK_GRAD_KERNEL(TILE_NAME, TILE, SUF, T, A)                                      \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)          \
        bk_bat_block_grad_##SUF##_##TILE_NAME(A* partial, const A* g, const T* w, bk::i64 blocks, \
                                              bk::i64 k_size, bk::i64 r, bk::i64 k_per_split) {   \
        bk::bat_block_grad<T, A, TILE>(partial, g, w, blocks, k_size, r, k_per_split);            \
    }

// bat_weight's output per out-block is (K, r): 128 x 16 tiles for r <= 32; dB_i is (r, r): 32 x 32 tiles for r <= 32.
#define BK_BAT_KERNELS(SUF, T, A)                              \
    BK_BAT_WEIGHT_KERNEL(t64x64, bk::Tile64x64, SUF, T, A)     \
    BK_BAT_WEIGHT_KERNEL(t128x16, bk::Tile128x16, SUF, T, A)   \
    BK_BAT_BLOCK_GRAD_KERNEL(t64x64, bk::Tile64x64, SUF, T, A) \
    BK_BAT_BLOCK_GRAD_KERNEL(t32x32, bk::Tile32x32, SUF, T, A)

BK_FOR_EACH_TYPE_PAIR(BK_BAT_KERNELS)
