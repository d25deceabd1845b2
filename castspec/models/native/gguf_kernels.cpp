// castspec's CPU kernels for the GGUF's own quantized weights (Q4_K, Q6_K) times int8 activations, AVX2.
//
// Why: the packaged models ship as Q4_K_M GGUF files. Running their blocks as they are reads ~1 GB per token
// instead of 6 GB (fp32) or 1.5 GB (int8), and the weights are not rounded a second time.
//
// Exact to itself: activations are quantized per row and per block of 256 (scale = max|x| / 127, as llama.cpp's
// Q8_K does), integer sums are exact, and each output (row, column) is reduced in one fixed order whatever the
// number of rows, the tile a row falls in or the thread that computes it. So a token's result is bitwise the same
// alone or beside any other tokens (tree siblings, other sequences).
//
// Layouts: Q6_K blocks are the GGUF's (ql[128] qh[64] scales int8[16] d fp16 = 210 bytes per 256 weights). Q4_K
// blocks are repacked once at load (d fp16, dmin fp16, 8 scales u8, 8 mins u8, qs[128] = 148 bytes) so the packed
// 6-bit scales are not unpacked every step. weight = d * scale * q - dmin * min (Q4_K); d * scale * (q - 32) (Q6_K).
// Built once per machine by castspec/models/native.py.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

// Activations: per row, per 256-block int8 (scale amax/127), bsum per 16.
extern "C" void quantize_rows(const float* x, int64_t n, int64_t k, int8_t* xq, float* xs, int16_t* bsum) {
    int64_t nb = k / 256;
#pragma omp parallel for schedule(static) if (n * k > 65536)
    for (int64_t rb = 0; rb < n * nb; rb++) {
        const float* v = x + rb * 256;
        __m256 mx = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < 256; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
        float t[8]; _mm256_storeu_ps(t, mx);
        float amax = 0.f; for (int i = 0; i < 8; i++) amax = t[i] > amax ? t[i] : amax;
        float inv = amax > 0 ? 127.f / amax : 0.f;
        xs[rb] = amax / 127.f;
        int8_t* q = xq + rb * 256;
        for (int i = 0; i < 256; i++) q[i] = (int8_t)nearbyintf(v[i] * inv);
        for (int j = 0; j < 16; j++) { int s = 0; for (int i = 0; i < 16; i++) s += q[j * 16 + i]; bsum[rb * 16 + j] = (int16_t)s; }
    }
}

static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

// repacked q4k block: d f16, dmin f16, sc u8[8], m u8[8], qs[128] = 148 bytes
#define Q4B 148
template <int NR>
static inline void q4k_tile(const uint8_t* w, int64_t nb, const int8_t* xq, const float* xs, const int16_t* bs, int64_t k,
                            float* out, int64_t ldo) {
    __m256 acc[NR], accm[NR];
    for (int r = 0; r < NR; r++) { acc[r] = _mm256_setzero_ps(); accm[r] = _mm256_setzero_ps(); }
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = w + b * Q4B;
        uint16_t dh, mh; memcpy(&dh, blk, 2); memcpy(&mh, blk + 2, 2);
        const float d = _cvtsh_ss(dh), dmin = _cvtsh_ss(mh);
        const uint8_t* sc = blk + 4;
        __m128i mins8 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(blk + 12)));
        __m256i mins16 = _mm256_setr_m128i(_mm_unpacklo_epi16(mins8, mins8), _mm_unpackhi_epi16(mins8, mins8));
        const uint8_t* qs = blk + 20;
        __m256i sumi[NR];
        for (int r = 0; r < NR; r++) sumi[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(q, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            __m256i s_lo = _mm256_set1_epi16(sc[2 * j]), s_hi = _mm256_set1_epi16(sc[2 * j + 1]);
            for (int r = 0; r < NR; r++) {
                const int8_t* xr = xq + r * k + b * 256 + 64 * j;
                __m256i p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xr)), s_lo);
                __m256i p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xr + 32))), s_hi);
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p_lo, p_hi));
            }
        }
        for (int r = 0; r < NR; r++) {
            const float s = xs[r * nb + b];
            __m256i mm = _mm256_madd_epi16(mins16, _mm256_loadu_si256((const __m256i*)(bs + (r * nb + b) * 16)));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * s), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            accm[r] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * s), _mm256_cvtepi32_ps(mm), accm[r]);
        }
    }
    for (int r = 0; r < NR; r++) out[r * ldo] = hsum8(acc[r]) - hsum8(accm[r]);
}

// q6k block (GGUF layout): ql[128] qh[64] scales i8[16] d f16 = 210 bytes
template <int NR>
static inline void q6k_tile(const uint8_t* w, int64_t nb, const int8_t* xq, const float* xs, const int16_t* bs, int64_t k,
                            float* out, int64_t ldo) {
    __m256 acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(0x03);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* blk = w + b * 210;
        const uint8_t* ql = blk; const uint8_t* qh = blk + 128;
        const int8_t* scl = (const int8_t*)(blk + 192);
        uint16_t dh; memcpy(&dh, blk + 208, 2);
        const float d = _cvtsh_ss(dh);
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)scl));
        __m256i sumi[NR];
        for (int r = 0; r < NR; r++) {
            __m256i c = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)(bs + (r * nb + b) * 16)));
            sumi[r] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(c, 5));
        }
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i*)(ql + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i*)(ql + 64 * h + 32));
            __m256i hh = _mm256_loadu_si256((const __m256i*)(qh + 32 * h));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hh, m3), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hh, 2), m3), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hh, 4), m3), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hh, 6), m3), 4));
            for (int t = 0; t < 4; t++) {
                int ks = h * 8 + 2 * t;
                __m256i sv = _mm256_setr_m128i(_mm_set1_epi16(scl[ks]), _mm_set1_epi16(scl[ks + 1]));
                for (int r = 0; r < NR; r++) {
                    const int8_t* xr = xq + r * k + b * 256 + 128 * h + 32 * t;
                    __m256i p = _mm256_maddubs_epi16(q[t], _mm256_loadu_si256((const __m256i*)xr));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, sv));
                }
            }
        }
        for (int r = 0; r < NR; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs[r * nb + b]), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
    }
    for (int r = 0; r < NR; r++) out[r * ldo] = hsum8(acc[r]);
}

#define TILE 4  // rows per tile: each weight block is unpacked once per tile
#define DISPATCH(KERNEL, BYTES)                                                                                   \
    int64_t nb = k / 256;                                                                                         \
    _Pragma("omp parallel for schedule(static)") for (int64_t o = 0; o < m; o++) {                                \
        const uint8_t* wr = w + o * nb * BYTES;                                                                   \
        int64_t r = 0;                                                                                            \
        for (; r + TILE <= n; r += TILE) KERNEL<TILE>(wr, nb, xq + r * k, xs + r * nb, bs + r * nb * 16, k, out + r * m + o, m); \
        switch (n - r) {                                                                                          \
            case 3: KERNEL<3>(wr, nb, xq + r * k, xs + r * nb, bs + r * nb * 16, k, out + r * m + o, m); break;  \
            case 2: KERNEL<2>(wr, nb, xq + r * k, xs + r * nb, bs + r * nb * 16, k, out + r * m + o, m); break;  \
            case 1: KERNEL<1>(wr, nb, xq + r * k, xs + r * nb, bs + r * nb * 16, k, out + r * m + o, m); break;  \
        }                                                                                                         \
    }

extern "C" void q4k_matmul(const uint8_t* w, int64_t m, int64_t k, const int8_t* xq, const float* xs,
                           const int16_t* bs, int64_t n, float* out) { DISPATCH(q4k_tile, Q4B) }
extern "C" void q6k_matmul(const uint8_t* w, int64_t m, int64_t k, const int8_t* xq, const float* xs,
                           const int16_t* bs, int64_t n, float* out) { DISPATCH(q6k_tile, 210) }
