/* Matrix-vector products for decoding one token (and a few rows): y[M][N] = x[M][K] @ W^T (* scale) + bias.
 *
 * W is stored in tiles of 32 output columns, [ceil(N / 32)][K][32], so each thread streams one contiguous range
 * of memory; its elements are float32, bfloat16 or int8 (with one float32 scale per column). Every product and
 * sum is float32. Threads come from OpenMP, the same runtime PyTorch's CPU build uses (loaded by it already).
 * gpt2term_block_* runs one transformer block for one token on these products, in one parallel region.
 * Built by gpt2term/core/accel/native.py for x86-64 with AVX2 and FMA.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 32
/* Bytes ahead of the stream to prefetch. For bf16 and int8 this measured faster on a 2-core Zen 3 (the hardware
 * prefetcher falls behind when each cache line holds fewer weights); float32 ran fastest without. */
#define PREFETCH_F32 0
#define PREFETCH_BF16 2048
#define PREFETCH_I8 2048

#define PREFETCH(r, PF, bytes)                                                                                        \
    if (PF)                                                                                                           \
        for (unsigned o = 0; o < (bytes); o += 64) _mm_prefetch((const char *)(r) + (PF) + o, _MM_HINT_T0);

static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline __m256 load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* exp(x) for float32 lanes: 2^n * exp(r) with r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2], exp(r) by its degree-7
 * Taylor polynomial (within about 2 float32 ulps there); x clamped to where 2^n stays a normal float. */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x); /* ln 2 in two parts: exact n * hi */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* GPT-2's GELU, the tanh form: 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3))), tanh(u) = 1 - 2 / (e^2u + 1). */
static inline __m256 gelu_ps(__m256 v) {
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                             _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
    u = _mm256_min_ps(_mm256_max_ps(u, _mm256_set1_ps(-10.0f)), _mm256_set1_ps(10.0f)); /* tanh is +-1 there */
    __m256 e = exp_ps(_mm256_add_ps(u, u)), one = _mm256_set1_ps(1.0f);
    __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, t));
}

enum { STORE, GELU, ADD }; /* what a tile does with its results: y = r, y = gelu(r), y += r (a residual) */

/* The tile's 32 results of one row, scaled and biased, into y[n0 .. n0 + width). */
static inline void store_tile(float *y, const __m256 *acc, const float *scale, const float *bias, int n0,
                              int width, int mode) {
    float out[TILE];
    for (int j = 0; j < 4; j++) {
        __m256 v = acc[j];
        if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + n0 + 8 * j));
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n0 + 8 * j));
        if (mode == GELU) v = gelu_ps(v);
        _mm256_storeu_ps(out + 8 * j, v);
    }
    if (mode == ADD)
        for (int j = 0; j < width; j++) y[n0 + j] += out[j];
    else
        memcpy(y + n0, out, sizeof(float) * width);
}

/* One row: two steps of k at a time into separate accumulators, so eight FMA chains run at once. */
#define TILE_ONE(NAME, T, LOAD, PF)                                                                                   \
    static void NAME(const T *w, const float *x, int K, __m256 *acc) {                                                \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;               \
        int k = 0;                                                                                                    \
        for (; k + 1 < K; k += 2) {                                                                                   \
            const T *r = w + (long)k * TILE;                                                                          \
            __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);                              \
            PREFETCH(r, PF, 2 * TILE * sizeof(T))                                                                     \
            a0 = _mm256_fmadd_ps(LOAD(r), x0, a0);                                                                    \
            a1 = _mm256_fmadd_ps(LOAD(r + 8), x0, a1);                                                                \
            a2 = _mm256_fmadd_ps(LOAD(r + 16), x0, a2);                                                               \
            a3 = _mm256_fmadd_ps(LOAD(r + 24), x0, a3);                                                               \
            b0 = _mm256_fmadd_ps(LOAD(r + 32), x1, b0);                                                               \
            b1 = _mm256_fmadd_ps(LOAD(r + 40), x1, b1);                                                               \
            b2 = _mm256_fmadd_ps(LOAD(r + 48), x1, b2);                                                               \
            b3 = _mm256_fmadd_ps(LOAD(r + 56), x1, b3);                                                               \
        }                                                                                                             \
        if (k < K) {                                                                                                  \
            const T *r = w + (long)k * TILE;                                                                          \
            __m256 x0 = _mm256_broadcast_ss(x + k);                                                                   \
            a0 = _mm256_fmadd_ps(LOAD(r), x0, a0);                                                                    \
            a1 = _mm256_fmadd_ps(LOAD(r + 8), x0, a1);                                                                \
            a2 = _mm256_fmadd_ps(LOAD(r + 16), x0, a2);                                                               \
            a3 = _mm256_fmadd_ps(LOAD(r + 24), x0, a3);                                                               \
        }                                                                                                             \
        acc[0] = _mm256_add_ps(a0, b0);                                                                               \
        acc[1] = _mm256_add_ps(a1, b1);                                                                               \
        acc[2] = _mm256_add_ps(a2, b2);                                                                               \
        acc[3] = _mm256_add_ps(a3, b3);                                                                               \
    }

/* Two rows share each converted weight. */
#define TILE_TWO(NAME, T, LOAD, PF)                                                                                   \
    static void NAME(const T *w, const float *x, const float *x2, int K, __m256 *acc, __m256 *acc2) {                 \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;               \
        for (int k = 0; k < K; k++) {                                                                                 \
            const T *r = w + (long)k * TILE;                                                                          \
            __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x2 + k);                                 \
            PREFETCH(r, PF, TILE * sizeof(T))                                                                         \
            __m256 w0 = LOAD(r), w1 = LOAD(r + 8), w2 = LOAD(r + 16), w3 = LOAD(r + 24);                              \
            a0 = _mm256_fmadd_ps(w0, x0, a0);                                                                         \
            b0 = _mm256_fmadd_ps(w0, x1, b0);                                                                         \
            a1 = _mm256_fmadd_ps(w1, x0, a1);                                                                         \
            b1 = _mm256_fmadd_ps(w1, x1, b1);                                                                         \
            a2 = _mm256_fmadd_ps(w2, x0, a2);                                                                         \
            b2 = _mm256_fmadd_ps(w2, x1, b2);                                                                         \
            a3 = _mm256_fmadd_ps(w3, x0, a3);                                                                         \
            b3 = _mm256_fmadd_ps(w3, x1, b3);                                                                         \
        }                                                                                                             \
        acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;                                                           \
        acc2[0] = b0, acc2[1] = b1, acc2[2] = b2, acc2[3] = b3;                                                       \
    }

/* Layer norm of one row (biased variance, as torch.nn.functional.layer_norm), sums in double. */
static void layer_norm(const float *x, const float *scale, const float *shift, float eps, float *out, int d) {
    double sum = 0, squares = 0;
    for (int i = 0; i < d; i++) sum += x[i];
    double mean = sum / d;
    for (int i = 0; i < d; i++) squares += (x[i] - mean) * (x[i] - mean);
    float inv = (float)(1.0 / sqrt(squares / d + eps)), m = (float)mean;
    for (int i = 0; i < d; i++) out[i] = (x[i] - m) * inv * scale[i] + shift[i];
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One head of causal attention for the token at `pos`: its key and value go into the cache ([capacity][hd] per
 * head), then softmax(q . k_j / sqrt(hd)) over positions 0..pos weighs the values into ctx. `p` holds pos + 8
 * floats. */
static void attend(const float *q, const float *k, const float *v, float *keys, float *values, int pos, int hd,
                   float *p, float *ctx) {
    memcpy(keys + (long)pos * hd, k, sizeof(float) * hd);
    memcpy(values + (long)pos * hd, v, sizeof(float) * hd);
    float scale = 1.0f / sqrtf((float)hd), top = -INFINITY;
    for (int j = 0; j <= pos; j++) {
        p[j] = dot(q, keys + (long)j * hd, hd) * scale;
        top = p[j] > top ? p[j] : top;
    }
    for (int j = pos + 1; j < ((pos + 8) & ~7); j++) p[j] = top; /* lanes past the end: computed, never used */
    for (int j = 0; j <= pos; j += 8)
        _mm256_storeu_ps(p + j, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + j), _mm256_set1_ps(top))));
    float total = 0;
    for (int j = 0; j <= pos; j++) total += p[j];
    for (int i = 0; i < hd; i++) ctx[i] = 0;
    for (int j = 0; j <= pos; j++) {
        const float *vj = values + (long)j * hd;
        float w = p[j] / total;
        int i = 0;
        for (; i + 8 <= hd; i += 8)
            _mm256_storeu_ps(ctx + i, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(vj + i),
                                                      _mm256_loadu_ps(ctx + i)));
        for (; i < hd; i++) ctx[i] += w * vj[i];
    }
}

/* One transformer block's weights, as decode.py lays them out (ctypes mirrors this struct). */
typedef struct {
    const float *norm1_scale, *norm1_shift, *norm2_scale, *norm2_shift;
    float norm1_eps, norm2_eps;
    const void *tiles[4]; /* query-key-value (fused), attention output, feed-forward in (GELU), feed-forward out */
    const float *scale[4]; /* int8's per-column scales, else NULL */
    const float *bias[4];  /* or NULL */
} gpt2term_block;

/* Floats of scratch `work` the block step needs. */
long gpt2term_block_work(int d, int heads, int ff, int capacity) {
    return 5L * d + ff + (long)heads * ((capacity + 8) & ~7);
}

/* One block for one token (batch 1) at position `pos`, in place on the residual row x[d]: what
 * GPTModel's TransformerBlock computes, with the KV cache of this layer ([heads][capacity][hd] keys and values)
 * extended by this token. One parallel region for the whole block: the small steps between the matrices (layer
 * norms on one thread, attention split by heads) cost no thread start-ups. */
#define BLOCK(S, T)                                                                                                   \
    void gpt2term_block_##S(const gpt2term_block *b, float *x, float *keys, float *values, int pos, int capacity,     \
                            int d, int heads, int ff, float *work, int threads) {                                     \
        float *h = work, *qkv = h + d, *ctx = qkv + 3 * d, *f = ctx + d, *scores = f + ff;                            \
        int hd = d / heads, span = (capacity + 8) & ~7;                                                               \
        _Pragma("omp parallel num_threads(threads)") {                                                                \
            _Pragma("omp single") layer_norm(x, b->norm1_scale, b->norm1_shift, b->norm1_eps, h, d);                  \
            tiles_##S(b->tiles[0], b->scale[0], b->bias[0], h, qkv, 1, d, 3 * d, STORE);                              \
            _Pragma("omp for schedule(static)") for (int i = 0; i < heads; i++) {                                     \
                long at = (long)i * capacity * hd;                                                                    \
                attend(qkv + i * hd, qkv + d + i * hd, qkv + 2 * d + i * hd, keys + at, values + at, pos, hd,         \
                       scores + (long)i * span, ctx + i * hd);                                                        \
            }                                                                                                         \
            tiles_##S(b->tiles[1], b->scale[1], b->bias[1], ctx, x, 1, d, d, ADD);                                    \
            _Pragma("omp single") layer_norm(x, b->norm2_scale, b->norm2_shift, b->norm2_eps, h, d);                  \
            tiles_##S(b->tiles[2], b->scale[2], b->bias[2], h, f, 1, d, ff, GELU);                                    \
            tiles_##S(b->tiles[3], b->scale[3], b->bias[3], f, x, 1, ff, d, ADD);                                     \
        }                                                                                                             \
    }

/* Rows in pairs, then the odd one; tiles split evenly over the threads of the enclosing parallel region. */
#define MATVEC(S, T, LOAD, PF)                                                                                        \
    TILE_ONE(one_##S, T, LOAD, PF)                                                                                    \
    TILE_TWO(two_##S, T, LOAD, PF)                                                                                    \
    static void tiles_##S(const T *w, const float *scale, const float *bias, const float *x, float *y, int M,         \
                             int K, int N, int mode) {                                                                \
        int tiles = (N + TILE - 1) / TILE;                                                                            \
        _Pragma("omp for schedule(static)")                                                                           \
        for (int t = 0; t < tiles; t++) {                                                                             \
            const T *wt = w + (long)t * K * TILE;                                                                     \
            int n0 = t * TILE, width = N - n0 < TILE ? N - n0 : TILE;                                                 \
            __m256 acc[4], acc2[4];                                                                                   \
            int m = 0;                                                                                                \
            for (; m + 1 < M; m += 2) {                                                                               \
                two_##S(wt, x + (long)m * K, x + (long)(m + 1) * K, K, acc, acc2);                                    \
                store_tile(y + (long)m * N, acc, scale, bias, n0, width, mode);                                       \
                store_tile(y + (long)(m + 1) * N, acc2, scale, bias, n0, width, mode);                                \
            }                                                                                                         \
            if (m < M) {                                                                                              \
                one_##S(wt, x + (long)m * K, K, acc);                                                                 \
                store_tile(y + (long)m * N, acc, scale, bias, n0, width, mode);                                       \
            }                                                                                                         \
        }                                                                                                             \
    }                                                                                                                 \
    void gpt2term_matvec_##S(const T *w, const float *scale, const float *bias, const float *x, float *y, int M,      \
                             int K, int N, int threads) {                                                             \
        _Pragma("omp parallel num_threads(threads)") tiles_##S(w, scale, bias, x, y, M, K, N, STORE);                 \
    }                                                                                                                 \
    BLOCK(S, T)

MATVEC(f32, float, load_f32, PREFETCH_F32)
MATVEC(bf16, uint16_t, load_bf16, PREFETCH_BF16)
MATVEC(i8, int8_t, load_i8, PREFETCH_I8)

int gpt2term_matvec_tile(void) { return TILE; }
