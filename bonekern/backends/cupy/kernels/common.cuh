// Shared prelude of bonekern's CUDA C++ kernels: element types, conversions, vector packs, the instantiation lists.
//
// Every .cu file in this directory compiles three ways, from the same text:
//   - NVRTC (what CuPy uses at run time; bonekern/backends/cupy/compile.py for ahead-of-time checks),
//   - nvcc (`nvcc -cubin -arch=sm_90 -std=c++17 -I<this dir> file.cu`),
//   - g++ with the host shim (tests/cupy/cuda_shim/cuda_shim.h), which runs each CUDA thread of a block as an OpenMP
//     thread so the tests can execute the kernels on CPU memory.
// So: no CUDA headers (NVRTC would need the toolkit's include dir; everything needed is defined here), no warp
// intrinsics, no tensor cores. The only device-only code is the fp16 conversion, which uses PTX `cvt` on the GPU
// and an exact software conversion elsewhere (the shim tests the software one against torch for every value).
//
// Conventions: all sizes, strides and indices are 64-bit (`bk::i64`); matrices are row-major with an explicit row
// stride where a kernel accepts views; "T" is the storage type of x / W / y / dx, "A" the accumulation type
// (float, or double when x or the block is float64).
#pragma once

#if !defined(__CUDACC__) && !defined(BK_HOST_SHIM)
#error "compile with NVRTC or nvcc, or include tests/cupy/cuda_shim/cuda_shim.h first"
#endif

// Checks that the host shim enforces (it records a failure the test suite raises); free on the GPU.
#ifndef BK_CHECK
#define BK_CHECK(condition) ((void)0)
#endif

namespace bk {

using i64 = long long;

// Every kernel is launched with exactly this many threads per block (the host side asserts it, the shim checks it).
constexpr int kBlockThreads = 256;
// __launch_bounds__(kBlockThreads, kMinBlocksPerSM) on every kernel: at most 128 registers per thread. With the
// thread count alone, ptxas 13 aimed for full occupancy (32-64 registers) and spilled the GEMM tiles.
constexpr int kMinBlocksPerSM = 2;

// 16-bit floats as raw storage; arithmetic always happens after widening to the accumulation type.
struct half_t {
    unsigned short bits;
};
struct bf16_t {
    unsigned short bits;
};

// ---------------------------------------------------------------------------------------------------------------
// Conversions. bf16 <-> float is exact bit arithmetic (round to nearest even, NaN kept quiet), identical on every
// target. fp16 uses the hardware conversion on the GPU and the same rounding in software elsewhere.
// ---------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_float(bf16_t v) {
    return __uint_as_float(static_cast<unsigned>(v.bits) << 16);
}

__device__ __forceinline__ bf16_t float_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    bf16_t out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = static_cast<unsigned short>((u >> 16) | 0x40u);  // NaN: keep it quiet
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
        out.bits = static_cast<unsigned short>(u >> 16);
    }
    return out;
}

__device__ __forceinline__ float half_to_float_soft(unsigned short h) {
    const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
    unsigned exponent = (h >> 10) & 0x1fu;
    unsigned mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));  // Inf / NaN
    if (exponent == 0) {
        if (mantissa == 0) return __uint_as_float(sign);
        exponent = 113;  // subnormal: normalise
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            --exponent;
        }
        return __uint_as_float(sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13));
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ __forceinline__ unsigned short float_to_half_soft(float value) {
    unsigned f = __float_as_uint(value);
    const unsigned sign = (f >> 16) & 0x8000u;
    f &= 0x7fffffffu;
    unsigned short out;
    if (f >= (143u << 23)) {  // >= 65536 (rounds to Inf), Inf or NaN
        out = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (f < (113u << 23)) {  // below the smallest normal half: let one float add do the rounding
        const unsigned magic = 126u << 23;  // 0.5f: adding it aligns the half subnormal grid to the float ulp
        out = static_cast<unsigned short>(__float_as_uint(__uint_as_float(f) + __uint_as_float(magic)) - magic);
    } else {
        const unsigned odd = (f >> 13) & 1u;
        f += (static_cast<unsigned>(15 - 127) << 23) + 0xfffu + odd;  // rebias and round to nearest even
        out = static_cast<unsigned short>(f >> 13);
    }
    return static_cast<unsigned short>(out | sign);
}

__device__ __forceinline__ float half_to_float(half_t v) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#else
    return half_to_float_soft(v.bits);
#endif
}

__device__ __forceinline__ half_t float_to_half(float f) {
    half_t out;
#if defined(__CUDA_ARCH__)
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(f));
#else
    out.bits = float_to_half_soft(f);
#endif
    return out;
}

// widen<A>(v): a stored element as the accumulation type A.
template <typename A>
__device__ __forceinline__ A widen(float v) {
    return static_cast<A>(v);
}
template <typename A>
__device__ __forceinline__ A widen(double v) {
    return static_cast<A>(v);
}
template <typename A>
__device__ __forceinline__ A widen(half_t v) {
    return static_cast<A>(half_to_float(v));
}
template <typename A>
__device__ __forceinline__ A widen(bf16_t v) {
    return static_cast<A>(bf16_to_float(v));
}

// narrow<T>(a): an accumulated value rounded to the storage type T (double -> 16-bit goes through float, like torch).
template <typename T>
struct Narrow;
template <>
struct Narrow<float> {
    __device__ __forceinline__ static float from(float a) { return a; }
    __device__ __forceinline__ static float from(double a) { return static_cast<float>(a); }
};
template <>
struct Narrow<double> {
    __device__ __forceinline__ static double from(float a) { return a; }
    __device__ __forceinline__ static double from(double a) { return a; }
};
template <>
struct Narrow<half_t> {
    __device__ __forceinline__ static half_t from(float a) { return float_to_half(a); }
    __device__ __forceinline__ static half_t from(double a) { return float_to_half(static_cast<float>(a)); }
};
template <>
struct Narrow<bf16_t> {
    __device__ __forceinline__ static bf16_t from(float a) { return float_to_bf16(a); }
    __device__ __forceinline__ static bf16_t from(double a) { return float_to_bf16(static_cast<float>(a)); }
};
template <typename T, typename A>
__device__ __forceinline__ T narrow(A a) {
    return Narrow<T>::from(a);
}

// ---------------------------------------------------------------------------------------------------------------
// Vector packs: V consecutive elements read or written with one 16-byte (or element-sized) memory instruction.
// The host launches a vectorised kernel only when the pointer, the row stride and the extents are V-aligned.
// ---------------------------------------------------------------------------------------------------------------

// Elements per 16-byte vector: 8 for 16-bit types, 4 for float, 2 for double.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
    return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& pack) {
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

}  // namespace bk

// Every (storage, accumulation) type pair the kernels are built for; X(suffix, T, A). The suffix names the pair in
// kernel names: bk_<kernel>_<suffix>_<variant>. bonekern/backends/cupy/sources.py holds the same list.
#define BK_FOR_EACH_TYPE_PAIR(X)    \
    X(f16_f32, bk::half_t, float)   \
    X(bf16_f32, bk::bf16_t, float)  \
    X(f32_f32, float, float)        \
    X(f16_f64, bk::half_t, double)  \
    X(bf16_f64, bk::bf16_t, double) \
    X(f32_f64, float, double)       \
    X(f64_f64, double, double)
