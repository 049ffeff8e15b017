// The CUDA host shim: lets g++ -fopenmp compile bonekern's .cu files unchanged and run their kernels on CPU memory.
//
// Execution model (docs/testing-without-gpu.md):
//   - one launch = one OpenMP parallel region with exactly blockDim.x * blockDim.y * blockDim.z threads; each
//     OpenMP thread is one CUDA thread (threadIdx is thread_local);
//   - the grid's blocks run one after another inside that region, separated by a barrier (blockIdx is per thread);
//   - __shared__ becomes function-static storage (shared by the region's threads, reused by the next block);
//   - __syncthreads() is `#pragma omp barrier`; atomicAdd is an omp atomic;
//   - float16 / bfloat16 are the kernels' own bit-level types (bk::half_t, bk::bf16_t), converted in software.
// What it cannot show: warp-synchronous behaviour (shuffles, votes), tensor-core or inline-PTX paths (the kernels
// keep them behind __CUDA_ARCH__), races between blocks (blocks never overlap), memory-model subtleties, and
// performance. What it adds: BK_CHECK conditions in the kernels and launch-geometry checks fail the launch.
#pragma once

#define BK_HOST_SHIM 1

#include <omp.h>

#include <atomic>
#include <cstddef>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace bk_shim {

inline dim3 grid_dim, block_dim;
inline thread_local dim3 block_idx, thread_idx;
inline std::atomic<int> failures{0};       // BK_CHECK failures and __trap() calls during the current launch
inline std::string first_failure;          // text of the first failed check (written under a critical section)

inline void record_failure(const char* what) {
    if (failures.fetch_add(1) == 0) {
#pragma omp critical(bk_shim_failure)
        first_failure = what;
    }
}

}  // namespace bk_shim

#define threadIdx (bk_shim::thread_idx)
#define blockIdx (bk_shim::block_idx)
#define blockDim (bk_shim::block_dim)
#define gridDim (bk_shim::grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __syncthreads() _Pragma("omp barrier")

#define BK_SHIM_STR2(x) #x
#define BK_SHIM_STR(x) BK_SHIM_STR2(x)
#define BK_CHECK(condition) \
    ((condition) ? (void)0 : bk_shim::record_failure(__FILE__ ":" BK_SHIM_STR(__LINE__) ": " #condition))

inline void __trap() { bk_shim::record_failure("__trap()"); }

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

template <typename T>
inline T atomicAdd(T* address, T value) {
    T old;
#pragma omp atomic capture
    {
        old = *address;
        *address += value;
    }
    return old;
}

namespace bk {
struct half_t;
struct bf16_t;
}  // namespace bk

namespace bk_shim {

// Kernel parameter type -> one-letter code, checked by the Python launcher against the arguments it passes:
// scalars in lower case, pointers as the upper-case code of what they point to (so tensor dtypes are checked too).
template <typename P>
constexpr char type_code() {
    if constexpr (std::is_pointer_v<P>) {
        constexpr char pointee = type_code<std::remove_cv_t<std::remove_pointer_t<P>>>();
        return pointee == '?' ? '?' : static_cast<char>(pointee - 'a' + 'A');
    } else if constexpr (std::is_same_v<P, long long>) {
        return 'q';
    } else if constexpr (std::is_same_v<P, float>) {
        return 'f';
    } else if constexpr (std::is_same_v<P, double>) {
        return 'd';
    } else if constexpr (std::is_same_v<P, bk::half_t>) {
        return 'h';
    } else if constexpr (std::is_same_v<P, bk::bf16_t>) {
        return 'b';
    } else {
        return '?';
    }
}

template <typename... P>
inline const char* signature(void (*)(P...)) {
    static const char codes[] = {type_code<P>()..., '\0'};
    return codes;
}

template <typename... P, std::size_t... I>
inline void invoke(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<P>*>(args[I])...);
}

// Runs the whole grid. Returns 0 on success, else an error code (see bk_shim_error_text in the generated unit).
template <typename... P>
inline int launch(void (*kernel)(P...), const unsigned* grid, const unsigned* block, void** args) {
    // The limits of every GPU bonekern targets (compute capability >= 7.0).
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return 1;
    if (block[2] > 64 || block[0] > 1024 || block[1] > 1024) return 2;
    const unsigned long long threads = 1ull * block[0] * block[1] * block[2];
    if (threads > 1024) return 2;
    if (grid[1] > 65535 || grid[2] > 65535 || grid[0] > 2147483647u) return 3;
    failures = 0;
    first_failure.clear();
    grid_dim = dim3{grid[0], grid[1], grid[2]};
    block_dim = dim3{block[0], block[1], block[2]};
    std::atomic<int> team_size_wrong{0};
    const int nthreads = static_cast<int>(threads);
    omp_set_dynamic(0);
#pragma omp parallel num_threads(nthreads)
    {
        if (omp_get_num_threads() != nthreads) {
            team_size_wrong = 1;  // every thread sees the same team size, so all of them skip the grid together
        } else {
            const unsigned t = static_cast<unsigned>(omp_get_thread_num());
            thread_idx = dim3{t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
            for (unsigned z = 0; z < grid[2]; ++z)
                for (unsigned y = 0; y < grid[1]; ++y)
                    for (unsigned x = 0; x < grid[0]; ++x) {
                        // Blocks run in turn: the previous block is done with the shared (static) memory.
#pragma omp barrier
                        block_idx = dim3{x, y, z};
                        invoke(kernel, args, std::index_sequence_for<P...>{});
                    }
        }
    }
    if (team_size_wrong) return 4;
    return failures ? 5 : 0;
}

}  // namespace bk_shim
