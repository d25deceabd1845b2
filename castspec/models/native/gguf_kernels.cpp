// castspec's CPU kernels for the GGUF's own quantized weights (Q4_K, Q6_K) times int8 activations, AVX2.
//
// Why: the packaged models ship as Q4_K_M GGUF files. Running their blocks reads ~1.1 GB per token instead of 6 GB
// (fp32) or 1.5 GB (int8), and the weights are not rounded a second time.
//
// Exact to itself: activations are quantized per row and per block of 256 (scale = max|x| / 127, as llama.cpp's
// Q8_K does); integer sums are exact; and each output (row, column) is reduced in one fixed order whatever the
// number of rows, the tile a row falls in or the thread that computes it. So a token's result is bitwise the same
// alone or beside any other tokens (tree siblings, other sequences).
//
// Layouts (made once at load by castspec/models/gguf_format.py): weights are interleaved by groups of 8 output
// columns so that one 32-byte vector holds 4 consecutive inputs of each of the 8 columns; one maddubs against 4
// broadcast activation bytes then feeds 8 columns at once and results need no horizontal sums. Per super-block of
// 256 inputs and group of 8 columns:
//   Q4_K: d f16[8], dmin f16[8], scales u8[8 sub][8 col], mins u8[8][8], nibbles [8 sub][4 g][32]   = 1184 bytes
//         (byte c*4+i of vector g: low nibble input g*8+i, high nibble input g*8+4+i of column c)
//         weight = d * scale * q - dmin * min, q in 0..15, one scale and min per 32 inputs
//   Q6_K: d f16[8], scales i8[16 sub][8 col], q u8 [32 g][2 h][32]                                   = 2192 bytes
//         (q in 0..63 kept one per byte: unpacking 6-bit values cost more than the extra bytes)
//         weight = d * scale * (q - 32), one scale per 16 inputs
// Integer headroom: a maddubs lane is at most 2 * 15 * 127 (Q4) or 2 * 63 * 127 (Q6); Q4 adds 8 of them in int16
// (30480 < 32767) before one multiply by the scale, Q6 two (32004).
// Speed: `keep(v)` (an empty asm that claims to change v) makes the compiler add each product into its accumulator
// as it goes; without it, g++ 12 hoisted all 32 products of a sub-block ahead of the adds and spilled them to the
// stack, and multi-row tiles ran 15-25% slower. Integer sums are exact, so the order of the adds changes no bit.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// Activations: per row, per 256-block: int8 (scale amax/127), sums per 16 and per 32.
extern "C" void quantize_rows(const float* x, int64_t n, int64_t k, int8_t* xq, float* xs, int16_t* bsum16,
                              int16_t* bsum32) {
    int64_t nb = k / 256;
#pragma omp parallel for schedule(static) if (n * k > 65536)
    for (int64_t rb = 0; rb < n * nb; rb++) {
        const float* v = x + rb * 256;
        __m256 mx = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < 256; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
        float t[8];
        _mm256_storeu_ps(t, mx);
        float amax = 0.f;
        for (int i = 0; i < 8; i++) amax = t[i] > amax ? t[i] : amax;
        float inv = amax > 0 ? 127.f / amax : 0.f;
        xs[rb] = amax / 127.f;
        int8_t* q = xq + rb * 256;
        for (int i = 0; i < 256; i++) q[i] = (int8_t)nearbyintf(v[i] * inv);
        for (int j = 0; j < 16; j++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += q[j * 16 + i];
            bsum16[rb * 16 + j] = (int16_t)s;
        }
        for (int j = 0; j < 8; j++) bsum32[rb * 8 + j] = (int16_t)(bsum16[rb * 16 + 2 * j] + bsum16[rb * 16 + 2 * j + 1]);
    }
}

static inline void keep(__m256i& v) { __asm__("" : "+x"(v)); }

static inline __m256i bcast32(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

static inline __m256i bcast32_16(const int16_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// (v, v) int16 pairs per 32-bit lane from 8 unsigned / signed bytes
static inline __m256i pair_u8(const uint8_t* p) {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    return _mm256_or_si256(x, _mm256_slli_epi32(x, 16));
}
static inline __m256i pair2_u8(const uint8_t* a, const uint8_t* b) {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)a));
    __m256i y = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)b));
    return _mm256_or_si256(x, _mm256_slli_epi32(y, 16));
}
static inline __m256i pair_i8(const int8_t* p) {
    __m256i x = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
    return _mm256_or_si256(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(x, 16));
}
static inline __m256i pair2_i8(const int8_t* a, const int8_t* b) {
    __m256i x = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)a));
    __m256i y = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)b));
    return _mm256_or_si256(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(y, 16));
}

// Q4_K x8 record per super-block: d f16[8], dmin f16[8], sc u8[8][8], mn u8[8][8], qs[8][4][32] = 1184 bytes.
// A row whose input size is 128 past a multiple of 256 (the 0.5B draft's 896) ends in a *half* record holding the
// first J = 4 sub-blocks only (d, dmin, sc[4][8], mn[4][8], qs[4][4][32] = 608 bytes): the other half of that
// super-block would be zero padding, whose products are exactly zero, so dropping it changes no bit and reads ~10%
// fewer bytes for such a linear. Activations stay padded to whole blocks of 256 (zeros past the input).
#define Q4X8 1184
#define Q4X8_HALF 608

// One super-block (J sub-blocks of 32) of NR rows against a group of 8 columns, added into acc.
template <int NR, int J>
static inline void q4k_block(const uint8_t* rec, int64_t b, int64_t nb, const int8_t* xq, const float* xs,
                             const int16_t* b32, int64_t k, __m256* acc) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)rec));
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(rec + 16)));
    const uint8_t* sc = rec + 32;
    const uint8_t* mn = rec + 32 + 8 * J;
    const uint8_t* qs = rec + 32 + 16 * J;
    __m256i sumi[NR];
    for (int r = 0; r < NR; r++) sumi[r] = _mm256_setzero_si256();
    for (int j = 0; j < J; j++) {
        __m256i a16[NR];
        for (int r = 0; r < NR; r++) a16[r] = _mm256_setzero_si256();
        for (int g = 0; g < 4; g++) {
            __m256i q = _mm256_loadu_si256((const __m256i*)(qs + j * 128 + g * 32));
            __m256i lo = _mm256_and_si256(q, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            for (int r = 0; r < NR; r++) {
                const int8_t* xo = xq + r * k + b * 256 + j * 32 + g * 8;
                a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(lo, bcast32(xo)));
                a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(hi, bcast32(xo + 4)));
                keep(a16[r]);
            }
        }
        const __m256i scv = pair_u8(sc + j * 8);
        for (int r = 0; r < NR; r++) sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(a16[r], scv));
    }
    __m256i mm[NR];
    for (int r = 0; r < NR; r++) mm[r] = _mm256_setzero_si256();
    for (int j = 0; j < J; j += 2) {
        const __m256i mnv = pair2_u8(mn + j * 8, mn + (j + 1) * 8);
        for (int r = 0; r < NR; r++)
            mm[r] = _mm256_add_epi32(mm[r], _mm256_madd_epi16(mnv, bcast32_16(b32 + (r * nb + b) * 8 + j)));
    }
    for (int r = 0; r < NR; r++) {
        const __m256 s = _mm256_set1_ps(xs[r * nb + b]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_mul_ps(dv, s), acc[r]);
        acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mm[r]), _mm256_mul_ps(mv, s), acc[r]);
    }
}

template <int NR>
static inline void q4k_tile(const uint8_t* w, int64_t nb, int64_t half, const int8_t* xq, const float* xs,
                            const int16_t* b32, int64_t k, float* out, int64_t ldo) {
    __m256 acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    const int64_t full = half ? nb - 1 : nb;
    for (int64_t b = 0; b < full; b++) q4k_block<NR, 8>(w + b * Q4X8, b, nb, xq, xs, b32, k, acc);
    if (half) q4k_block<NR, 4>(w + full * Q4X8, full, nb, xq, xs, b32, k, acc);
    for (int r = 0; r < NR; r++) _mm256_storeu_ps(out + r * ldo, acc[r]);
}

#define Q6X8 2192
template <int NR>
static inline void q6k_tile(const uint8_t* w, int64_t nb, int64_t, const int8_t* xq, const float* xs, const int16_t* b16,
                            int64_t k, float* out, int64_t ldo) {
    __m256 acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* rec = w + b * Q6X8;
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)rec));
        const int8_t* sc = (const int8_t*)(rec + 16);
        const uint8_t* qv = rec + 144;
        __m256i sumi[NR];
        for (int r = 0; r < NR; r++) sumi[r] = _mm256_setzero_si256();
        for (int s16 = 0; s16 < 16; s16++) {
            const __m256i scv = pair_i8(sc + s16 * 8);
            for (int gg = 0; gg < 2; gg++) {
                const int g = s16 * 2 + gg;  // group of 8 k
                const __m256i lo = _mm256_loadu_si256((const __m256i*)(qv + g * 64));
                const __m256i hi = _mm256_loadu_si256((const __m256i*)(qv + g * 64 + 32));
                for (int r = 0; r < NR; r++) {
                    const int8_t* xo = xq + r * k + b * 256 + g * 8;
                    __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast32(xo)),
                                                 _mm256_maddubs_epi16(hi, bcast32(xo + 4)));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(t, scv));
                    keep(sumi[r]);
                }
            }
        }
        __m256i cc[NR];
        for (int r = 0; r < NR; r++) cc[r] = _mm256_setzero_si256();
        for (int j = 0; j < 16; j += 2) {
            const __m256i sv = pair2_i8(sc + j * 8, sc + (j + 1) * 8);
            for (int r = 0; r < NR; r++)
                cc[r] = _mm256_add_epi32(cc[r], _mm256_madd_epi16(sv, bcast32_16(b16 + (r * nb + b) * 16 + j)));
        }
        for (int r = 0; r < NR; r++) {
            const __m256i tot = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(cc[r], 5));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_mul_ps(dv, _mm256_set1_ps(xs[r * nb + b])), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) _mm256_storeu_ps(out + r * ldo, acc[r]);
}

#define TILE 4
#define ROW_CHUNK 64

template <bool Q6, int NR>
static inline void tile(const uint8_t* w, int64_t nb, int64_t half, const int8_t* xq, const float* xs,
                        const int16_t* sums, int64_t k, float* out, int64_t ldo) {
    if (Q6)
        q6k_tile<NR>(w, nb, half, xq, xs, sums, k, out, ldo);
    else
        q4k_tile<NR>(w, nb, half, xq, xs, sums, k, out, ldo);
}

// Rows [r0, r1) of one group of 8 columns (records `wg`) into out's columns 0-7: tiles of TILE rows, then the rest.
// Q6_K reads the sums per 16 inputs, Q4_K per 32.
template <bool Q6>
static inline void group_rows(const uint8_t* wg, int64_t nb, int64_t half, int64_t r0, int64_t r1, const int8_t* xq,
                              const float* xs, const int16_t* bsum16, const int16_t* bsum32, int64_t k, float* out,
                              int64_t ldo) {
    const int64_t per = Q6 ? 16 : 8;
    const int16_t* sums = Q6 ? bsum16 : bsum32;
    int64_t r = r0;
#define ROWS(NR) tile<Q6, NR>(wg, nb, half, xq + r * k, xs + r * nb, sums + r * nb * per, k, out + r * ldo, ldo)
    for (; r + TILE <= r1; r += TILE) ROWS(TILE);
    switch (r1 - r) {
        case 3: ROWS(3); break;
        case 2: ROWS(2); break;
        case 1: ROWS(1); break;
    }
#undef ROWS
}

static inline int64_t record_bytes(bool q6, int64_t nb, int64_t half) {
    return q6 ? nb * Q6X8 : (half ? (nb - 1) * Q4X8 + Q4X8_HALF : nb * Q4X8);
}

// Column groups a thread takes at a time. Few rows (decoding, small trees): the weights stream from memory, and one
// contiguous share per thread (as a static schedule) keeps each thread's reads sequential. Many rows (prefill): the
// tiles are compute-bound and a thread that the VM slows down would hold the other at the barrier; small shares
// taken as threads come free balance that (m = 8960, k = 1536, 64 rows: 5.8 instead of 6.3 ms on a 2-core AMD EPYC;
// 1-4 rows 0.73-0.93x if shared dynamically too). Which thread computes a column changes no bit.
static inline int64_t share_of_groups(int64_t groups, int64_t rows) {
    if (rows > 8) return 4;
#ifdef _OPENMP
    const int64_t threads = omp_get_max_threads();
#else
    const int64_t threads = 1;  // built without OpenMP (benchmarks/q4k_kernels/floor.cpp): one thread
#endif
    return (groups + threads - 1) / threads;
}

template <bool Q6>
static void matmul(const uint8_t* w, int64_t m, int64_t k, const int8_t* xq, const float* xs, const int16_t* bsum16,
                   const int16_t* bsum32, int64_t n, float* out, int64_t ldo, int64_t half) {
    const int64_t nb = k / 256, groups = m / 8, stride = record_bytes(Q6, nb, half);
    for (int64_t r0 = 0; r0 < n; r0 += ROW_CHUNK) {
        const int64_t r1 = r0 + ROW_CHUNK < n ? r0 + ROW_CHUNK : n;
        const int64_t per = share_of_groups(groups, r1 - r0);
#pragma omp parallel for schedule(dynamic, per)
        for (int64_t gi = 0; gi < groups; gi++)
            group_rows<Q6>(w + gi * stride, nb, half, r0, r1, xq, xs, bsum16, bsum32, k, out + gi * 8, ldo);
    }
}

// `half`: each column's last record is a half one (Q4_K only; see Q4X8_HALF); k counts the padded inputs.
extern "C" void q4k_matmul(const uint8_t* w, int64_t m, int64_t k, const int8_t* xq, const float* xs,
                           const int16_t* bsum16, const int16_t* bsum32, int64_t n, float* out, int64_t ldo,
                           int64_t half) {
    matmul<false>(w, m, k, xq, xs, bsum16, bsum32, n, out, ldo, half);
}
extern "C" void q6k_matmul(const uint8_t* w, int64_t m, int64_t k, const int8_t* xq, const float* xs,
                           const int16_t* bsum16, const int16_t* bsum32, int64_t n, float* out, int64_t ldo,
                           int64_t half) {
    matmul<true>(w, m, k, xq, xs, bsum16, bsum32, n, out, ldo, half);
}

// Only the listed groups of 8 columns: out[:, 8i .. 8i+8) = rows x the columns of group groups[i]. For a look at a
// few columns of a large matrix (castspec/models/greedy_head.py); each group runs the full matmul's own tiles, so
// its values are bitwise the same as there.
extern "C" void matmul_groups(const uint8_t* w, int64_t q6, int64_t k, int64_t half, const int64_t* groups,
                              int64_t count, const int8_t* xq, const float* xs, const int16_t* bsum16,
                              const int16_t* bsum32, int64_t n, float* out, int64_t ldo) {
    const int64_t nb = k / 256, stride = record_bytes(q6, nb, half);
#pragma omp parallel for schedule(dynamic, 8) if (count > 8)
    for (int64_t i = 0; i < count; i++) {
        const uint8_t* wg = w + groups[i] * stride;
        if (q6)
            group_rows<true>(wg, nb, half, 0, n, xq, xs, bsum16, bsum32, k, out + i * 8, ldo);
        else
            group_rows<false>(wg, nb, half, 0, n, xq, xs, bsum16, bsum32, k, out + i * 8, ldo);
    }
}

// The groups of 8 columns that may hold a row's largest value (castspec/models/greedy_head.py): per row, lower =
// max_j (coarse[j] - bound[j] * norm), and a group stays if any row has coarse[j] + bound[j] * norm >= lower, over
// the `cols` real columns (a last group's padding columns are never looked at). Writes the kept group ids in
// ascending order and returns their count; -1 if a coarse value is not finite (no bound holds then). Only soundness
// matters here, not bits: the bounds carry a margin for the rounding of this arithmetic.
extern "C" int64_t select_groups(const float* coarse, int64_t rows, int64_t cols, int64_t ld, const float* bound,
                                 const float* norms, int64_t* groups) {
    const int64_t count = (cols + 7) / 8;
    uint8_t* keep = new uint8_t[count]();
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float* c = coarse + r * ld;
        const float norm = norms[r];
        float lower = -INFINITY;
        for (int64_t j = 0; j < cols; j++) {
            const float v = c[j];
            bad |= !(fabsf(v) <= 3.0e38f);  // NaN or infinite
            const float low = v - bound[j] * norm;
            lower = low > lower ? low : lower;
        }
        for (int64_t j = 0; j < cols; j++) keep[j / 8] |= c[j] + bound[j] * norm >= lower;
    }
    int64_t kept = 0;
    for (int64_t g = 0; g < count; g++)
        if (keep[g]) groups[kept++] = g;
    delete[] keep;
    return bad ? -1 : kept;
}
