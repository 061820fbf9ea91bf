/* Matrix-vector products for decoding one token (and a few rows): y[M][N] = x[M][K] @ W^T (* scale) + bias.
 *
 * W is stored in tiles of 32 output columns, [ceil(N / 32)][K][32], so each thread streams one contiguous range
 * of memory; its elements are float32, bfloat16 or int8 (with one float32 scale per column). Every product and
 * sum is float32. Threads come from OpenMP, the same runtime PyTorch's CPU build uses (loaded by it already).
 * Built by gpt2term/core/accel/native.py for x86-64 with AVX2 and FMA.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define TILE 32
/* Bytes ahead of the stream to prefetch. For bf16 and int8 this measured faster on a 2-core Zen 3 (the hardware
 * prefetcher falls behind when each cache line holds fewer weights); float32 ran fastest without. */
#define PREFETCH_F32 0
#define PREFETCH_BF16 2048
#define PREFETCH_I8 2048

#define PREFETCH(r, PF, bytes)                                                                                    \
    if (PF)                                                                                                      \
        for (unsigned o = 0; o < (bytes); o += 64) _mm_prefetch((const char *)(r) + (PF) + o, _MM_HINT_T0);

static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline __m256 load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* The tile's 32 results of one row, scaled and biased, into y[n0 .. n0 + width). */
static inline void store_tile(float *y, const __m256 *acc, const float *scale, const float *bias, int n0,
                              int width) {
    float out[TILE];
    for (int j = 0; j < 4; j++) {
        __m256 v = acc[j];
        if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + n0 + 8 * j));
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n0 + 8 * j));
        _mm256_storeu_ps(out + 8 * j, v);
    }
    memcpy(y + n0, out, sizeof(float) * width);
}

/* One row: two steps of k at a time into separate accumulators, so eight FMA chains run at once. */
#define TILE_ONE(NAME, T, LOAD, PF)                                                                                   \
    static void NAME(const T *w, const float *x, int K, __m256 *acc) {                                           \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;          \
        int k = 0;                                                                                               \
        for (; k + 1 < K; k += 2) {                                                                              \
            const T *r = w + (long)k * TILE;                                                                     \
            __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);                        \
            PREFETCH(r, PF, 2 * TILE * sizeof(T))                                                               \
            a0 = _mm256_fmadd_ps(LOAD(r), x0, a0);                                                               \
            a1 = _mm256_fmadd_ps(LOAD(r + 8), x0, a1);                                                           \
            a2 = _mm256_fmadd_ps(LOAD(r + 16), x0, a2);                                                          \
            a3 = _mm256_fmadd_ps(LOAD(r + 24), x0, a3);                                                          \
            b0 = _mm256_fmadd_ps(LOAD(r + 32), x1, b0);                                                          \
            b1 = _mm256_fmadd_ps(LOAD(r + 40), x1, b1);                                                          \
            b2 = _mm256_fmadd_ps(LOAD(r + 48), x1, b2);                                                          \
            b3 = _mm256_fmadd_ps(LOAD(r + 56), x1, b3);                                                          \
        }                                                                                                        \
        if (k < K) {                                                                                             \
            const T *r = w + (long)k * TILE;                                                                     \
            __m256 x0 = _mm256_broadcast_ss(x + k);                                                              \
            a0 = _mm256_fmadd_ps(LOAD(r), x0, a0);                                                               \
            a1 = _mm256_fmadd_ps(LOAD(r + 8), x0, a1);                                                           \
            a2 = _mm256_fmadd_ps(LOAD(r + 16), x0, a2);                                                          \
            a3 = _mm256_fmadd_ps(LOAD(r + 24), x0, a3);                                                          \
        }                                                                                                        \
        acc[0] = _mm256_add_ps(a0, b0);                                                                          \
        acc[1] = _mm256_add_ps(a1, b1);                                                                          \
        acc[2] = _mm256_add_ps(a2, b2);                                                                          \
        acc[3] = _mm256_add_ps(a3, b3);                                                                          \
    }

/* Two rows share each converted weight. */
#define TILE_TWO(NAME, T, LOAD, PF)                                                                                   \
    static void NAME(const T *w, const float *x, const float *x2, int K, __m256 *acc, __m256 *acc2) {            \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;          \
        for (int k = 0; k < K; k++) {                                                                            \
            const T *r = w + (long)k * TILE;                                                                     \
            __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x2 + k);                           \
            PREFETCH(r, PF, TILE * sizeof(T))                                                                   \
            __m256 w0 = LOAD(r), w1 = LOAD(r + 8), w2 = LOAD(r + 16), w3 = LOAD(r + 24);                         \
            a0 = _mm256_fmadd_ps(w0, x0, a0);                                                                    \
            b0 = _mm256_fmadd_ps(w0, x1, b0);                                                                    \
            a1 = _mm256_fmadd_ps(w1, x0, a1);                                                                    \
            b1 = _mm256_fmadd_ps(w1, x1, b1);                                                                    \
            a2 = _mm256_fmadd_ps(w2, x0, a2);                                                                    \
            b2 = _mm256_fmadd_ps(w2, x1, b2);                                                                    \
            a3 = _mm256_fmadd_ps(w3, x0, a3);                                                                    \
            b3 = _mm256_fmadd_ps(w3, x1, b3);                                                                    \
        }                                                                                                        \
        acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;                                                      \
        acc2[0] = b0, acc2[1] = b1, acc2[2] = b2, acc2[3] = b3;                                                  \
    }

/* Rows in pairs, then the odd one; tiles split evenly over the threads. */
#define MATVEC(NAME, T, LOAD, PF)                                                                                     \
    TILE_ONE(NAME##_one, T, LOAD, PF)                                                                                \
    TILE_TWO(NAME##_two, T, LOAD, PF)                                                                                \
    void NAME(const T *w, const float *scale, const float *bias, const float *x, float *y, int M, int K, int N, \
              int threads) {                                                                                     \
        int tiles = (N + TILE - 1) / TILE;                                                                       \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                        \
        for (int t = 0; t < tiles; t++) {                                                                        \
            const T *wt = w + (long)t * K * TILE;                                                                \
            int n0 = t * TILE, width = N - n0 < TILE ? N - n0 : TILE;                                            \
            __m256 acc[4], acc2[4];                                                                              \
            int m = 0;                                                                                           \
            for (; m + 1 < M; m += 2) {                                                                          \
                NAME##_two(wt, x + (long)m * K, x + (long)(m + 1) * K, K, acc, acc2);                            \
                store_tile(y + (long)m * N, acc, scale, bias, n0, width);                                        \
                store_tile(y + (long)(m + 1) * N, acc2, scale, bias, n0, width);                                 \
            }                                                                                                    \
            if (m < M) {                                                                                         \
                NAME##_one(wt, x + (long)m * K, K, acc);                                                         \
                store_tile(y + (long)m * N, acc, scale, bias, n0, width);                                        \
            }                                                                                                    \
        }                                                                                                        \
    }

MATVEC(gpt2term_matvec_f32, float, load_f32, PREFETCH_F32)
MATVEC(gpt2term_matvec_bf16, uint16_t, load_bf16, PREFETCH_BF16)
MATVEC(gpt2term_matvec_i8, int8_t, load_i8, PREFETCH_I8)

int gpt2term_matvec_tile(void) { return TILE; }
