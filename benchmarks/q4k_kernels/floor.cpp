// How close the q4k tile kernel runs to this CPU's int8 multiply floor (README, "Target formats").
//
// Build and run from the repository root:
//   g++ -O2 -mavx2 -mfma -mf16c -std=c++17 benchmarks/q4k_kernels/floor.cpp -o /tmp/floor && /tmp/floor
//
// Prints, in cycles of the time-stamp counter (TSC): a chain of dependent scalar adds (one core cycle each, so it
// gives the core clock in TSC cycles), independent vpmaddubsw (their throughput), and the kernel's Q4_K tile for
// 1-4 rows with weights and activations in L1, per 32-byte weight vector (64 weights; 2 maddubs per row), and
// what that is of the maddubs floor (2 per row and vector at the measured throughput).
#include "../../castspec/models/native/gguf_kernels.cpp"

#include <initializer_list>
#include <stdio.h>
#include <stdlib.h>
#include <x86intrin.h>

static double dependent_add() {
    const long n = 200000000;
    long x = 1;
    unsigned long long t0 = __rdtsc();
    for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    return double(__rdtsc() - t0) / n / 4;
}

static double maddubs_throughput() {
    const long n = 100000000;
    unsigned long long t0 = __rdtsc();
    for (long i = 0; i < n; i++)  // 8 independent vpmaddubsw (written in asm: compiler barriers can chain them)
        __asm__ volatile(
            "vpmaddubsw %%ymm14, %%ymm15, %%ymm0\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm1\n\t"
            "vpmaddubsw %%ymm14, %%ymm15, %%ymm2\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm3\n\t"
            "vpmaddubsw %%ymm14, %%ymm15, %%ymm4\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm5\n\t"
            "vpmaddubsw %%ymm14, %%ymm15, %%ymm6\n\tvpmaddubsw %%ymm14, %%ymm15, %%ymm7"
            ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7");
    return double(__rdtsc() - t0) / n / 8;
}

template <int NR>
static double tile_cycles(int64_t nb, int iters) {
    const int64_t k = nb * 256;
    uint8_t* w = (uint8_t*)aligned_alloc(64, nb * Q4X8);
    int8_t* xq = (int8_t*)aligned_alloc(64, NR * k);
    float xs[64], out[8 * 4];
    int16_t b32[64 * 8] = {0};
    for (int64_t i = 0; i < nb * Q4X8; i++) w[i] = rand();
    for (int64_t i = 0; i < NR * k; i++) xq[i] = rand() % 200 - 100;
    for (int i = 0; i < 64; i++) xs[i] = 1.f;
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < 16; i++) ((uint16_t*)(w + b * Q4X8))[i] = 0x3c00;  // d, dmin = 1.0
    unsigned long long t0 = __rdtsc();
    for (int it = 0; it < iters; it++) {
        q4k_tile<NR>(w, nb, 0, xq, xs, b32, k, out, 8);
        __asm__ volatile("" : : "r"(out) : "memory");  // each call's result counts: none is hoisted or dropped
    }
    double cycles = double(__rdtsc() - t0) / iters / (nb * 32);
    volatile float sink = out[0];
    (void)sink;
    free(w);
    free(xq);
    return cycles;
}

int main() {
    const double add = dependent_add(), maddubs = maddubs_throughput();
    printf("dependent add:          %.2f TSC cycles (one core cycle)\n", add);
    printf("vpmaddubsw throughput:  %.2f TSC cycles each (%.2f per core cycle)\n", maddubs, add / maddubs);
    const int64_t nb = 6;  // k = 1536: a group's weights (7 KB) and 4 rows of activations stay in L1
    const double tiles[4] = {tile_cycles<1>(nb, 20000), tile_cycles<2>(nb, 20000), tile_cycles<3>(nb, 20000),
                             tile_cycles<4>(nb, 20000)};
    for (int rows = 1; rows <= 4; rows++)
        printf("q4k tile, %d row(s): %.2f TSC cycles per 32-byte weight vector, %.0f%% of the maddubs floor\n", rows,
               tiles[rows - 1], 100 * 2 * rows * maddubs / tiles[rows - 1]);
}
