// One whole decoder layer (Llama/Qwen2 style) of a q4k model in one call, AVX2: RMSNorm, q/k/v, rotary, the KV
// cache write, attention, o_proj, RMSNorm, gate/up, SiLU, down, and both residual adds.
//
// Why: with the weights in Q4_K (gguf_kernels.cpp) a token's linears take ~47 ms on a 2-core host, but the ~25 torch
// calls around them per layer (norms, rotary, cache writes, canonical attention, masks) added ~40 ms more. Here the
// whole layer is one ctypes call.
//
// Exact to itself: every step is computed per token (row) in a fixed order that depends only on that row's numbers.
// Attention visits a query's keys in position order (the committed prefix, read in place, then the slots the caller
// lists for the rest: tree ancestors or the block's earlier tokens), so a tree node sees the very same sequence of
// keys and values as the same token decoded alone, and the sums run in the same order: its output is bitwise equal.
// Softmax lanes are assigned by key index j (0..L-1 in position order), never by slot or by the number of queries.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

extern "C" void quantize_rows(const float* x, int64_t n, int64_t k, int8_t* xq, float* xs, int16_t* bsum16,
                              int16_t* bsum32);
extern "C" void q4k_matmul(const uint8_t* w, int64_t m, int64_t k, const int8_t* xq, const float* xs,
                           const int16_t* bsum16, const int16_t* bsum32, int64_t n, float* out, int64_t ldo,
                           int64_t half);
extern "C" void q6k_matmul(const uint8_t* w, int64_t m, int64_t k, const int8_t* xq, const float* xs,
                           const int16_t* bsum16, const int16_t* bsum32, int64_t n, float* out, int64_t ldo,
                           int64_t half);

// A projection: kernel-layout blocks, output columns (a multiple of 8), input size padded to a multiple of 256 (the
// blocks' extra columns are zeros; the inputs' are zeroed here), Q6_K or Q4_K, optional bias [cols], and whether
// its rows end in a half record (gguf_kernels.cpp).
struct Proj {
    const uint8_t* w;
    int64_t cols, k, q6;
    const float* bias;
    int64_t half;
};

struct LayerSpec {
    Proj q, k, v, o, gate, up, down;
    const float* norm1;
    const float* norm2;
    float eps1, eps2, scale, pad;
    int64_t hidden, heads, kv_heads, head_dim, inter;
};

// What one forward's tokens are (shared by the layers): rows = batch * n tokens.
struct StepSpec {
    int64_t batch, n;
    const float* cos;            // [rows, head_dim]
    const float* sin;            // [rows, head_dim]
    const int64_t* positions;    // [rows]
    const int64_t* write_slot;   // [rows] cache slot of each token's key/value
    const int64_t* in_place;     // [batch] positions below this sit at their own slot (seen up to the query's own)
    const int64_t* tail;         // [rows, tail_width] slots of the query's further keys, in position order
    const uint8_t* tail_valid;   // [rows, tail_width]
    int64_t tail_width;
    int64_t capacity;            // slots per (row, kv head) in the cache [batch, kv_heads, capacity, head_dim]
};

// A layer's working buffers are kept per thread from one call to the next: made anew, a prefill's (~120 MB per
// layer at 783 tokens) were page-faulted in and zeroed by every layer of every forward. Contents carry over, so
// whatever a kernel reads but does not write (the zero padding of a projection's input) is cleared on each use. A
// buffer larger than SCRATCH_KEEP (a long prompt's) is freed after its layer instead of staying resident.
#define SCRATCH_KEEP ((size_t)64 << 20)

template <class T>
struct Buffer {
    std::vector<T> v;
    T* get(size_t count) {
        if (v.size() < count) v.resize(count);
        return v.data();
    }
    void trim() {
        if (v.size() * sizeof(T) > SCRATCH_KEEP) std::vector<T>().swap(v);
    }
};

struct Activations {
    Buffer<int8_t> q;
    Buffer<float> s;
    Buffer<int16_t> s16, s32;
    int64_t n = 0;
    void trim() {
        q.trim(), s.trim(), s16.trim(), s32.trim();
    }
};

struct Scratch {
    Buffer<float> normed, qkv, att, proj, gate_up, act, kept_att, kept_hidden;
    Activations a;
    void trim() {
        normed.trim(), qkv.trim(), att.trim(), proj.trim(), gate_up.trim(), act.trim(), kept_att.trim(),
            kept_hidden.trim(), a.trim();
    }
};
static thread_local Scratch scratch;

// Columns [from, to) of `rows` rows `ld` apart set to zero (a projection input's padding past its real size).
static void zero_columns(float* x, int64_t rows, int64_t from, int64_t to, int64_t ld) {
    if (from < to)
        for (int64_t r = 0; r < rows; r++) memset(x + r * ld + from, 0, (to - from) * sizeof(float));
}

// Rows rows[0..count) of x (rows `ld` long) into out, one after another; and back.
static void gather_rows(const float* x, int64_t ld, const int64_t* rows, int64_t count, float* out) {
    for (int64_t i = 0; i < count; i++) memcpy(out + i * ld, x + rows[i] * ld, ld * sizeof(float));
}
static void scatter_rows(const float* x, int64_t ld, const int64_t* rows, int64_t count, float* out) {
    for (int64_t i = 0; i < count; i++) memcpy(out + rows[i] * ld, x + i * ld, ld * sizeof(float));
}

static void quantize(const float* x, int64_t n, int64_t k, Activations& a) {
    a.n = n;
    quantize_rows(x, n, k, a.q.get(n * k), a.s.get(n * k / 256), a.s16.get(n * k / 16), a.s32.get(n * k / 32));
}

static void linear_into(const Proj& p, const Activations& a, float* out, int64_t ldo) {
    (p.q6 ? q6k_matmul : q4k_matmul)(p.w, p.cols, p.k, a.q.v.data(), a.s.v.data(), a.s16.v.data(), a.s32.v.data(),
                                     a.n, out, ldo, p.half);
    if (p.bias)
        for (int64_t r = 0; r < a.n; r++)
            for (int64_t c = 0; c < p.cols; c++) out[r * ldo + c] += p.bias[c];
}

static inline float hsum(__m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// exp(x) for 8 floats: range reduction by ln 2, degree-6 polynomial on [-ln2/2, ln2/2] (relative error ~2e-7).
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out = weight * (x / sqrt(mean(x^2) + eps)), per row (as transformers' RMSNorm in float32); out's rows are `ldo`
// long (columns past h are left as they are: the zero padding of a projection's input).
static void rms_norm(const float* x, const float* weight, float eps, int64_t rows, int64_t h, float* out,
                     int64_t ldo) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        const float* v = x + r * h;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= h; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(v + i), _mm256_loadu_ps(v + i), acc);
        float ss = hsum(acc);
        for (; i < h; i++) ss += v[i] * v[i];
        const float inv = 1.0f / sqrtf(ss / (float)h + eps);
        for (int64_t j = 0; j < h; j++) out[r * ldo + j] = weight[j] * (v[j] * inv);
    }
}

// x cos + rotate_half(x) sin on `count` heads of one row, in place.
static void rotate(float* x, int64_t count, int64_t d, const float* cos, const float* sin) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < count; h++) {
        float* v = x + h * d;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

// The 8 horizontal sums of a[0..7] in one vector (lane h = sum of a[h]), in a fixed order.
static inline __m256 hsum8(const __m256* a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Scores of NH query heads (rows of q, d apart) against each listed key: s[h * ld + j] = scale * q_h . k_j. Each
// key is loaded once for all heads; each (head, key) sum runs over d in one fixed order.
template <int NH>
static void head_scores(const float* q, const float* keys, const int64_t* slots, int64_t count, int64_t d, float scale,
                        float* s, int64_t ld) {
    for (int64_t j = 0; j < count; j++) {
        const float* k = keys + slots[j] * d;
        __m256 acc[8];
        for (int h = 0; h < 8; h++) acc[h] = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 kv = _mm256_loadu_ps(k + i);
            for (int h = 0; h < NH; h++) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + i), kv, acc[h]);
        }
        float t[8];
        _mm256_storeu_ps(t, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
        for (int h = 0; h < NH; h++) s[h * ld + j] = t[h];
    }
}

static void scores_of_heads(int64_t heads, const float* q, const float* keys, const int64_t* slots, int64_t count,
                            int64_t d, float scale, float* s, int64_t ld) {
    for (int64_t h0 = 0; h0 < heads; h0 += 8) {
        const float* qh = q + h0 * d;
        float* sh = s + h0 * ld;
        switch (heads - h0 >= 8 ? 8 : heads - h0) {
            case 8: head_scores<8>(qh, keys, slots, count, d, scale, sh, ld); break;
            case 7: head_scores<7>(qh, keys, slots, count, d, scale, sh, ld); break;
            case 6: head_scores<6>(qh, keys, slots, count, d, scale, sh, ld); break;
            case 5: head_scores<5>(qh, keys, slots, count, d, scale, sh, ld); break;
            case 4: head_scores<4>(qh, keys, slots, count, d, scale, sh, ld); break;
            case 3: head_scores<3>(qh, keys, slots, count, d, scale, sh, ld); break;
            case 2: head_scores<2>(qh, keys, slots, count, d, scale, sh, ld); break;
            default: head_scores<1>(qh, keys, slots, count, d, scale, sh, ld); break;
        }
    }
}

// acc[0:8*V] (+)= sum over j of w[j] * values[slots[j]][0:8*V], in j order, the accumulators held in registers;
// `first` starts them at zero, else they continue from acc (a sum split over key blocks adds in the same order).
template <int V>
static inline void weighted_sum(const float* w, const int64_t* slots, int64_t count, const float* values, int64_t d,
                                float* acc, bool first) {
    __m256 r[V];
    for (int t = 0; t < V; t++) r[t] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + 8 * t);
    for (int64_t j = 0; j < count; j++) {
        const __m256 wj = _mm256_set1_ps(w[j]);
        const float* v = values + slots[j] * d;
        for (int t = 0; t < V; t++) r[t] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + 8 * t), r[t]);
    }
    for (int t = 0; t < V; t++) _mm256_storeu_ps(acc + 8 * t, r[t]);
}

static void weighted_sum_row(const float* w, const int64_t* slots, int64_t count, const float* values, int64_t d,
                             float* acc, bool first) {
    for (int64_t c = 0; c < d; c += 64) {  // 8 registers of the output at a time
        switch ((d - c) >= 64 ? 8 : (d - c) / 8) {
            case 8: weighted_sum<8>(w, slots, count, values + c, d, acc + c, first); break;
            case 7: weighted_sum<7>(w, slots, count, values + c, d, acc + c, first); break;
            case 6: weighted_sum<6>(w, slots, count, values + c, d, acc + c, first); break;
            case 5: weighted_sum<5>(w, slots, count, values + c, d, acc + c, first); break;
            case 4: weighted_sum<4>(w, slots, count, values + c, d, acc + c, first); break;
            case 3: weighted_sum<3>(w, slots, count, values + c, d, acc + c, first); break;
            case 2: weighted_sum<2>(w, slots, count, values + c, d, acc + c, first); break;
            default: weighted_sum<1>(w, slots, count, values + c, d, acc + c, first); break;
        }
    }
}

// Scores s[0:count] (padded with -inf to `padded`, a multiple of 8) become exp(s - max), in place; returns their sum.
// Lanes are assigned by key index, so the sum's order depends on the key count only.
static float softmax_weights(float* s, int64_t count, int64_t padded) {
    float top = -INFINITY;
    for (int64_t j = 0; j < count; j++) top = s[j] > top ? s[j] : top;
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {  // padding lanes are exp(-inf) = 0
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(top)));
        const __m256 live = _mm256_cmp_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m256 w = _mm256_and_ps(e, live);
        _mm256_storeu_ps(s + j, w);
        sum = _mm256_add_ps(sum, w);
    }
    return hsum(sum);
}

// Keys per block of the prefix that a task's rows share: 64 keys and their values (2 x 32 KB at head_dim 128) stay
// in cache while every row of the task uses them, so each is read from memory once per task, not once per row.
#define KEY_BLOCK 64
#define ATTEND_ROWS 8  // rows of one sequence per task

// Rows [r0, r1) of one sequence and one kv head: each row's group of query heads attends to the row's keys in
// position order (the committed prefix in place up to the row's own position, then its listed slots). The key
// prefix all the rows see is visited block by block for all rows together; per (row, head, key) the arithmetic and
// its order are those of the row alone, so the result is bitwise the same whoever shares the task.
static void attend_rows(const LayerSpec& L, const StepSpec& S, int64_t r0, int64_t r1, int64_t h, const float* qkv,
                        int64_t qkv_ld, const float* kcache, const float* vcache, float* out) {
    const int64_t d = L.head_dim, groups = L.heads / L.kv_heads, b = r0 / S.n, rows = r1 - r0;
    const float* keys = kcache + (b * L.kv_heads + h) * S.capacity * d;
    const float* values = vcache + (b * L.kv_heads + h) * S.capacity * d;
    std::vector<std::vector<int64_t>> slots(rows);
    std::vector<std::vector<float>> scores(rows), acc(rows);
    int64_t shared = INT64_MAX;
    for (int64_t i = 0; i < rows; i++) {
        const int64_t r = r0 + i, own = S.in_place[b] < S.positions[r] + 1 ? S.in_place[b] : S.positions[r] + 1;
        slots[i].reserve(own + S.tail_width);
        for (int64_t j = 0; j < own; j++) slots[i].push_back(j);
        for (int64_t t = 0; t < S.tail_width; t++)
            if (S.tail_valid[r * S.tail_width + t]) slots[i].push_back(S.tail[r * S.tail_width + t]);
        scores[i].assign(groups * ((slots[i].size() + 7) / 8 * 8), -INFINITY);
        acc[i].resize(groups * d);
        shared = own < shared ? own : shared;
    }
    const float* q0 = qkv + h * groups * d;
    auto ld = [&](int64_t i) { return (int64_t)scores[i].size() / groups; };
    for (int64_t j0 = 0; j0 < shared; j0 += KEY_BLOCK) {
        const int64_t n = shared - j0 < KEY_BLOCK ? shared - j0 : KEY_BLOCK;
        for (int64_t i = 0; i < rows; i++)
            scores_of_heads(groups, q0 + (r0 + i) * qkv_ld, keys, slots[i].data() + j0, n, d, L.scale,
                            scores[i].data() + j0, ld(i));
    }
    std::vector<float> total(rows * groups);
    for (int64_t i = 0; i < rows; i++) {
        const int64_t count = (int64_t)slots[i].size();
        scores_of_heads(groups, q0 + (r0 + i) * qkv_ld, keys, slots[i].data() + shared, count - shared, d, L.scale,
                        scores[i].data() + shared, ld(i));
        for (int64_t g = 0; g < groups; g++) total[i * groups + g] = softmax_weights(scores[i].data() + g * ld(i), count,
                                                                                 ld(i));
    }
    for (int64_t j0 = 0; j0 < shared; j0 += KEY_BLOCK) {
        const int64_t n = shared - j0 < KEY_BLOCK ? shared - j0 : KEY_BLOCK;
        for (int64_t i = 0; i < rows; i++)
            for (int64_t g = 0; g < groups; g++)
                weighted_sum_row(scores[i].data() + g * ld(i) + j0, slots[i].data() + j0, n, values, d,
                                 acc[i].data() + g * d, j0 == 0);
    }
    for (int64_t i = 0; i < rows; i++) {
        const int64_t count = (int64_t)slots[i].size();
        for (int64_t g = 0; g < groups; g++) {
            float* a = acc[i].data() + g * d;
            weighted_sum_row(scores[i].data() + g * ld(i) + shared, slots[i].data() + shared, count - shared, values,
                             d, a, shared == 0);
            float* o = out + (r0 + i) * L.o.k + (h * groups + g) * d;
            const float sum = total[i * groups + g], inv = sum > 0 ? 1.0f / sum : 0.0f;
            for (int64_t c = 0; c < d; c++) o[c] = a[c] * inv;
        }
    }
}

// A half's input: `hidden` RMS-normed into k-wide rows (columns past H: the projections' zero padding), quantized.
static void norm_and_quantize(const float* hidden, const float* weight, float eps, int64_t rows, int64_t H, int64_t k,
                              Activations& a) {
    float* normed = scratch.normed.get(rows * k);
    zero_columns(normed, rows, H, k, k);
    rms_norm(hidden, weight, eps, rows, H, normed, k);
    quantize(normed, rows, k, a);
}

// Attention half: norm, q/k/v, rotary, cache write, attention, o_proj; hidden += result. With `kept`, every row is
// still projected (q too: one projection call for all rows) and its key and value go to the cache, but only the
// `count` listed rows attend and get o_proj (see decoder_layer_kept).
static void attention_block(const LayerSpec& L, const StepSpec& S, float* hidden, float* kcache, float* vcache,
                            const int64_t* kept = nullptr, int64_t count = 0) {
    const int64_t rows = S.batch * S.n, H = L.hidden, d = L.head_dim;
    const int64_t qd = L.heads * d, kd = L.kv_heads * d, ld = qd + 2 * kd;
    float* qkv = scratch.qkv.get(rows * ld);
    float* att = scratch.att.get(rows * L.o.k);
    float* proj = scratch.proj.get(rows * H);
    Activations& a = scratch.a;
    zero_columns(att, rows, qd, L.o.k, L.o.k);
    norm_and_quantize(hidden, L.norm1, L.eps1, rows, H, L.q.k, a);
    linear_into(L.q, a, qkv, ld);
    linear_into(L.k, a, qkv + qd, ld);
    linear_into(L.v, a, qkv + qd + kd, ld);
    for (int64_t r = 0; r < rows; r++) {
        float* row = qkv + r * ld;
        rotate(row, L.heads + L.kv_heads, d, S.cos + r * d, S.sin + r * d);
        const int64_t b = r / S.n, slot = S.write_slot[r];
        for (int64_t h = 0; h < L.kv_heads; h++) {
            const int64_t at = ((b * L.kv_heads + h) * S.capacity + slot) * d;
            memcpy(kcache + at, row + qd + h * d, d * sizeof(float));
            memcpy(vcache + at, row + qd + kd + h * d, d * sizeof(float));
        }
    }
    if (kept) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int64_t task = 0; task < count * L.kv_heads; task++) {
            const int64_t h = task % L.kv_heads, r = kept[task / L.kv_heads];
            attend_rows(L, S, r, r + 1, h, qkv, ld, kcache, vcache, att);
        }
        float* gathered = scratch.kept_att.get(count * L.o.k);
        gather_rows(att, L.o.k, kept, count, gathered);
        quantize(gathered, count, L.o.k, a);
        linear_into(L.o, a, proj, H);
        for (int64_t i = 0; i < count; i++)
            for (int64_t c = 0; c < H; c++) hidden[kept[i] * H + c] += proj[i * H + c];
        return;
    }
    const int64_t chunks = (S.n + ATTEND_ROWS - 1) / ATTEND_ROWS;  // tasks: (sequence, row chunk, kv head)
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < S.batch * chunks * L.kv_heads; task++) {
        const int64_t h = task % L.kv_heads, chunk = task / L.kv_heads % chunks, b = task / L.kv_heads / chunks;
        const int64_t r0 = b * S.n + chunk * ATTEND_ROWS, r1 = r0 + ATTEND_ROWS < (b + 1) * S.n ? r0 + ATTEND_ROWS
                                                                                             : (b + 1) * S.n;
        attend_rows(L, S, r0, r1, h, qkv, ld, kcache, vcache, att);
    }
    quantize(att, rows, L.o.k, a);
    linear_into(L.o, a, proj, H);
    for (int64_t i = 0; i < rows * H; i++) hidden[i] += proj[i];
}

// MLP half of `rows` rows: norm, gate/up, SiLU(gate) * up, down; hidden += result.
static void mlp_block(const LayerSpec& L, int64_t rows, float* hidden) {
    const int64_t H = L.hidden, I = L.inter;
    float* gate_up = scratch.gate_up.get(rows * 2 * I);
    float* act = scratch.act.get(rows * L.down.k);
    float* proj = scratch.proj.get(rows * H);
    Activations& a = scratch.a;
    zero_columns(act, rows, I, L.down.k, L.down.k);
    norm_and_quantize(hidden, L.norm2, L.eps2, rows, H, L.gate.k, a);
    linear_into(L.gate, a, gate_up, 2 * I);
    linear_into(L.up, a, gate_up + I, 2 * I);
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        const float* g = gate_up + r * 2 * I;
        float* y = act + r * L.down.k;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(y + i, _mm256_mul_ps(silu, _mm256_loadu_ps(g + I + i)));
        }
        for (; i < I; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * g[I + i];
    }
    quantize(act, rows, L.down.k, a);
    linear_into(L.down, a, proj, H);
    for (int64_t i = 0; i < rows * H; i++) hidden[i] += proj[i];
}

extern "C" void decoder_layer(const LayerSpec* layer, const StepSpec* step, float* hidden, float* kcache,
                              float* vcache) {
    attention_block(*layer, *step, hidden, kcache, vcache);
    mlp_block(*layer, step->batch * step->n, hidden);
    scratch.trim();
}

// A model's last layer when only some rows' outputs are used (a prefill keeps each sequence's last position): every
// row's key and value are written as by decoder_layer, but attention, o_proj and the MLP run for the `count` rows
// listed in `kept` only (ascending row indices of hidden); the other rows of hidden are left as they were. Each
// step is per row, so the kept rows' results and the cache are bitwise decoder_layer's. In a 137-token prefill
// of the 1.5B target that skips ~93% of the layer's multiplies (all but q, k and v of the other rows).
extern "C" void decoder_layer_kept(const LayerSpec* layer, const StepSpec* step, float* hidden, float* kcache,
                                   float* vcache, const int64_t* kept, int64_t count) {
    attention_block(*layer, *step, hidden, kcache, vcache, kept, count);
    const int64_t H = layer->hidden;
    float* rows = scratch.kept_hidden.get(count * H);
    gather_rows(hidden, H, kept, count, rows);
    mlp_block(*layer, count, rows);
    scatter_rows(rows, H, kept, count, hidden);
    scratch.trim();
}
