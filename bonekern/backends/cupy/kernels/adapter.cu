// The bone/mini adapter term alone (no weight), for base layers that run their own forward:
//
//   bk_adapter_group_sum_<pair>_dropout:  S[m, j] = sum over g of x[m, g * r + j] * keep(m, g * r + j)
//                                         (the host scales S by 1 / (1 - p) afterwards, in S's dtype)
//   bk_adapter_spread_<pair>_{plain,dropout}:  dx[m, k] = T[m, k % r] (* keep(m, k)), written (not added)
//
// keep(i, k) is the counter-based mask of bonekern/dropout.py, bit for bit: counter c = offset + i * K + k
// (64-bit), key = mix(seed ^ mix(hi32(c) ^ 0x9E3779B9)), keep = (mix(lo32(c) ^ key) >> 8) >= threshold, with mix
// the lowbias32 hash in uint32 arithmetic. Nothing of M x K is read back in backward: the mask is recomputed.
// S, T are (M, r) contiguous in the accumulation type; x and dx are read / written through their row strides.
// (delta = S D itself is bone.cu's tiled epilogue in its write-only form, bk_bone_write_adapter.)
#include "common.cuh"

namespace bk {

__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

// Whether element `counter` of the dropout stream survives (seed: 32 bits, threshold = round(p * 2^24)).
__device__ __forceinline__ bool dropout_keep(i64 counter, i64 seed, i64 threshold) {
    const unsigned long long c = static_cast<unsigned long long>(counter);
    const unsigned key = mix32(static_cast<unsigned>(seed) ^ mix32(static_cast<unsigned>(c >> 32) ^ 0x9E3779B9u));
    return static_cast<i64>(mix32(static_cast<unsigned>(c) ^ key) >> 8) >= threshold;
}

// One thread per output S[m, j] (grid-stride): consecutive threads read consecutive columns of a group.
template <typename T, typename A>
__device__ __forceinline__ void adapter_group_sum(const T* __restrict__ x, A* __restrict__ s, i64 rows, i64 cols,
                                                  i64 row_stride, i64 col_stride, i64 r, i64 seed, i64 offset,
                                                  i64 threshold) {
    BK_CHECK(blockDim.x == kBlockThreads && blockDim.y == 1 && blockDim.z == 1);
    const i64 total = rows * r;
    const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 row = i / r, j = i - row * r;
        const T* x_row = x + row * row_stride;
        const i64 base = offset + row * cols;
        A acc = A(0);
        for (i64 col = j; col < cols; col += r) {
            if (dropout_keep(base + col, seed, threshold)) acc += widen<A>(x_row[col * col_stride]);
        }
        s[i] = acc;
    }
}

// dx[m, k] = t[m, k % r], zero where the mask drops (m, k) when kDropout. Grid-stride over rows * cols elements.
template <typename T, typename A, bool kDropout>
__device__ __forceinline__ void adapter_spread(T* __restrict__ dx, const A* __restrict__ t, i64 rows, i64 cols,
                                               i64 dx_row_stride, i64 r, i64 seed, i64 offset, i64 threshold) {
    BK_CHECK(blockDim.x == kBlockThreads && blockDim.y == 1 && blockDim.z == 1);
    const i64 total = rows * cols;
    const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 row = i / cols, col = i - row * cols;
        A value = t[row * r + col % r];
        if (kDropout && !dropout_keep(offset + i, seed, threshold)) value = A(0);
        dx[row * dx_row_stride + col] = narrow<T>(value);
    }
}

}  // namespace bk

#define BK_ADAPTER_KERNELS(SUF, T, A)                                                                              \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)                           \
        bk_adapter_group_sum_##SUF##_dropout(const T* x, A* s, bk::i64 rows, bk::i64 cols, bk::i64 row_stride,     \
                                             bk::i64 col_stride, bk::i64 r, bk::i64 seed, bk::i64 offset,          \
                                             bk::i64 threshold) {                                                  \
        bk::adapter_group_sum<T, A>(x, s, rows, cols, row_stride, col_stride, r, seed, offset, threshold);         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)                           \
        bk_adapter_spread_##SUF##_plain(T* dx, const A* t, bk::i64 rows, bk::i64 cols, bk::i64 dx_row_stride,      \
                                        bk::i64 r, bk::i64 seed, bk::i64 offset, bk::i64 threshold) {              \
        bk::adapter_spread<T, A, false>(dx, t, rows, cols, dx_row_stride, r, seed, offset, threshold);             \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(bk::kBlockThreads, bk::kMinBlocksPerSM)                           \
        bk_adapter_spread_##SUF##_dropout(T* dx, const A* t, bk::i64 rows, bk::i64 cols, bk::i64 dx_row_stride,    \
                                          bk::i64 r, bk::i64 seed, bk::i64 offset, bk::i64 threshold) {            \
        bk::adapter_spread<T, A, true>(dx, t, rows, cols, dx_row_stride, r, seed, offset, threshold);              \
    }

BK_FOR_EACH_TYPE_PAIR(BK_ADAPTER_KERNELS)
