// Bone / mini epilogues, both in place on a tensor cuBLAS has just written:
//
//   bk_bone_add_adapter:  y[m, n] += sum_c S[m, c] * D[c, n % C]        (forward: y = x W^T + b already there)
//   bk_bone_write_adapter: y[m, n]  = sum_c S[m, c] * D[c, n % C]        (the adapter term alone: adapter.cu)
//   bk_bone_add_grouped:  dx[m, k] += T[m, k % r]                        (backward: dx = dY W already there,
//                                                                          T = dY D^T of shape (M, r))
//
// D is the block (r, C) in the accumulation type with C | N (C = N for bone, mini_r for mini); S and T are (M, r)
// contiguous in the accumulation type. The sum is formed in the accumulation type and rounded once into y / dx.
#include "tile_gemm.cuh"

namespace bk {

// Tiled rank-r product added into y (M, N) with row stride y_row_stride (kAdd), or written there (the adapter
// term alone: y is not read). Grid: one block per BM x BN tile.
template <typename T, typename A, class TileT, bool kAdd = true>
__device__ __forceinline__ void bone_add_adapter(T* __restrict__ y, const A* __restrict__ s, const A* __restrict__ d,
                                                 i64 m_size, i64 n_size, i64 y_row_stride, i64 r, i64 cols) {
    BK_CHECK(blockDim.x == TileT::kThreads && blockDim.y == 1 && blockDim.z == 1);
    const TileIndex t = tile_index<TileT>(m_size, n_size);
    A acc[TileT::TM][TileT::TN];
    zero_tile<TileT>(acc);
    tile_gemm<TileT, A, false>(
        acc, t.m0, t.n0, m_size, n_size, 0, r, [=](i64 m, i64 k) { return s[m * r + k]; },
        [=](i64 k, i64 n) { return d[k * cols + (n < cols ? n : n % cols)]; });
#pragma unroll
    for (int i = 0; i < TileT::TM; ++i) {
        const i64 m = t.m0 + tile_row<TileT>(i);
#pragma unroll
        for (int j = 0; j < TileT::TN; ++j) {
            const i64 n = t.n0 + tile_col<TileT>(j);
            if (m < m_size && n < n_size) {
                T* p = y + m * y_row_stride + n;
                *p = kAdd ? narrow<T>(widen<A>(*p) + acc[i][j]) : narrow<T>(acc[i][j]);
            }
        }
    }
}

// dx[m, k] += t[m, k % r], V elements per thread and step (V > 1 only when dx, its row stride, the columns and r are
// all V-aligned, so one vector never straddles a group boundary). Grid-stride loop over rows * cols / V vectors.
template <typename T, typename A, int V>
__device__ __forceinline__ void bone_add_grouped(T* __restrict__ dx, const A* __restrict__ t, i64 rows, i64 cols,
                                                 i64 dx_row_stride, i64 r) {
    BK_CHECK(blockDim.x == kBlockThreads && blockDim.y == 1 && blockDim.z == 1);
    BK_CHECK(cols % V == 0 && r % V == 0);
    const i64 vectors_per_row = cols / V;
    const i64 total = rows * vectors_per_row;
    const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 row = i / vectors_per_row;
        const i64 col = (i - row * vectors_per_row) * V;
        T* p = dx + row * dx_row_stride + col;
        const A* t_row = t + row * r + col % r;
        Pack<T, V> pack = load_pack<T, V>(p);
#pragma unroll
        for (int v = 0; v < V; ++v) pack.v[v] = narrow<T>(widen<A>(pack.v[v]) + t_row[v]);
        store_pack<T, V>(p, pack);
    }
}

}  // namespace bk

#define BK_ADD_ADAPTER_KERNEL(TILE_NAME, TILE, SUF, T, A)                                                     \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)                      \
        bk_bone_add_adapter_##SUF##_##TILE_NAME(T* y, const A* s, const A* d, bk::i64 m_size, bk::i64 n_size, \
                                                bk::i64 y_row_stride, bk::i64 r, bk::i64 cols) {              \
        bk::bone_add_adapter<T, A, TILE>(y, s, d, m_size, n_size, y_row_stride, r, cols);                     \
    }

#define BK_WRITE_ADAPTER_KERNEL(TILE_NAME, TILE, SUF, T, A)                                                     \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)                        \
        bk_bone_write_adapter_##SUF##_##TILE_NAME(T* y, const A* s, const A* d, bk::i64 m_size, bk::i64 n_size, \
                                                  bk::i64 y_row_stride, bk::i64 r, bk::i64 cols) {              \
        bk::bone_add_adapter<T, A, TILE, false>(y, s, d, m_size, n_size, y_row_stride, r, cols);                \
    }

#define BK_ADD_GROUPED_KERNEL(SUF, T, A, NAME, V)                                         \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)  \
        bk_bone_add_grouped_##SUF##_##NAME(T* dx, const A* t, bk::i64 rows, bk::i64 cols, \
                                           bk::i64 dx_row_stride, bk::i64 r) {            \
        bk::bone_add_grouped<T, A, V>(dx, t, rows, cols, dx_row_stride, r);               \
    }

#define BK_BONE_KERNELS(SUF, T, A)                          \
    BK_ADD_ADAPTER_KERNEL(t64x64, bk::Tile64x64, SUF, T, A) \
    BK_ADD_ADAPTER_KERNEL(t32x32, bk::Tile32x32, SUF, T, A) \
    BK_WRITE_ADAPTER_KERNEL(t64x64, bk::Tile64x64, SUF, T, A) \
    BK_WRITE_ADAPTER_KERNEL(t32x32, bk::Tile32x32, SUF, T, A) \
    BK_ADD_GROUPED_KERNEL(SUF, T, A, scalar, 1)             \
    BK_ADD_GROUPED_KERNEL(SUF, T, A, vec16, bk::kVec16<T>)

BK_FOR_EACH_TYPE_PAIR(BK_BONE_KERNELS)
