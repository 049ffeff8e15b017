// Group sums: out[m, c] = sum over g of in[m, g * width + c] for c < width, in the accumulation type, reading `in`
// through any (row, column) strides; columns past the end count as zero.
//
// Used three ways by bonekern/backends/cupy/host.py:
//   - Bone's S = group_sum(x, r): the r-wide groups of x, the last one zero-padded like PEFT (K % r != 0);
//   - mini's fold of dY over the N / C repeats of its block: dY_folded = group_sum(dY, C);
//   - a widening copy (width = columns, one group) of a column chunk of dY for Bone's backward.
//
// Thread layout: a block is (threads_per_row, kBlockThreads / threads_per_row); threadIdx.y picks the row. A row's
// columns are read in "units" of V elements (V > 1: one 16-byte load). When the group has at least as many units as
// threads_per_row, each thread owns whole columns and loops over the groups. Otherwise `lanes` threads share each
// unit, lane l summing groups l, l + lanes, ... (consecutive threads still read consecutive addresses), and the
// lanes' partial sums are added in shared memory.
#include "common.cuh"

namespace bk {

template <typename T, typename A, int V>
__device__ __forceinline__ void accumulate_unit(A (&acc)[V], const T* row, i64 col, i64 col_stride) {
    if (V == 1) {
        acc[0] += widen<A>(row[col * col_stride]);
    } else {  // the host guarantees col_stride == 1 and V-aligned addresses
        const Pack<T, V> pack = load_pack<T, V>(row + col);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += widen<A>(pack.v[v]);
    }
}

template <typename T, typename A, int V>
__device__ __forceinline__ void group_sum(const T* __restrict__ in, A* __restrict__ out, i64 rows, i64 cols,
                                          i64 row_stride, i64 col_stride, i64 width) {
    BK_CHECK(blockDim.x * blockDim.y == kBlockThreads && blockDim.z == 1);
    BK_CHECK(width % V == 0 && (V == 1 || col_stride == 1));
    __shared__ A partial[kBlockThreads * V];
    const int tx = static_cast<int>(threadIdx.x), threads_per_row = static_cast<int>(blockDim.x);
    const i64 row = static_cast<i64>(blockIdx.x) * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const T* in_row = in + (active ? row : 0) * row_stride;
    A* out_row = out + (active ? row : 0) * width;
    const i64 units = width / V;
    const i64 groups = (cols + width - 1) / width;

    if (units >= threads_per_row) {  // each thread owns whole columns: no sharing, no barrier (uniform branch)
        if (!active) return;
        for (i64 u = tx; u < units; u += threads_per_row) {
            A acc[V];
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] = A(0);
            for (i64 g = 0; g < groups; ++g) {
                const i64 col = g * width + u * V;
                if (col < cols) accumulate_unit<T, A, V>(acc, in_row, col, col_stride);
            }
#pragma unroll
            for (int v = 0; v < V; ++v) out_row[u * V + v] = acc[v];
        }
        return;
    }

    const int lanes = threads_per_row / static_cast<int>(units);
    const int unit = tx % static_cast<int>(units), lane = tx / static_cast<int>(units);
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = A(0);
    if (active && lane < lanes) {
        for (i64 g = lane; g < groups; g += lanes) {
            const i64 col = g * width + unit * V;
            if (col < cols) accumulate_unit<T, A, V>(acc, in_row, col, col_stride);
        }
    }
    // Thread tx = lane * units + unit stores its V sums at [tx * V, tx * V + V) = lane * width + unit * V + v.
    A* row_partial = partial + static_cast<int>(threadIdx.y) * threads_per_row * V;
#pragma unroll
    for (int v = 0; v < V; ++v) row_partial[tx * V + v] = acc[v];
    __syncthreads();
    if (!active) return;
    for (i64 c = tx; c < width; c += threads_per_row) {
        A sum = A(0);
        for (int l = 0; l < lanes; ++l) sum += row_partial[l * width + c];
        out_row[c] = sum;
    }
}

}  // namespace bk

#define BK_GROUP_SUM_KERNEL(SUF, T, A, NAME, V)                                                          \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)                 \
        bk_group_sum_##SUF##_##NAME(const T* in, A* out, bk::i64 rows, bk::i64 cols, bk::i64 row_stride, \
                                    bk::i64 col_stride, bk::i64 width) {                                 \
        bk::group_sum<T, A, V>(in, out, rows, cols, row_stride, col_stride, width);                      \
    }

#define BK_GROUP_SUM_KERNELS(SUF, T, A)       \
    BK_GROUP_SUM_KERNEL(SUF, T, A, scalar, 1) \
    BK_GROUP_SUM_KERNEL(SUF, T, A, vec16, bk::kVec16<T>)

BK_FOR_EACH_TYPE_PAIR(BK_GROUP_SUM_KERNELS)
