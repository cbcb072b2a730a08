/* Products of float32 activations with block-quantized weights on AVX-512 VNNI integer
 * dot products (engine/blockq.py converts GGUF blocks to this layout, builds and loads
 * this file).
 *
 * Weights: per output row n, blocks of 32 columns, each with an fp16 scale s and an
 * offset z (an fp16 array for Q4_1; else implied: -8 s for 4-bit codes, -128 s for
 * 8-bit ones), w = c * s + z:
 *   kind 8: c in 0..255 (Q8_0's int8 codes with the sign bit flipped), a byte each;
 *   kind 4: c in 0..15, a nibble each.
 * A row's blocks go in groups of 16 (512 columns), then a tail of fewer than 16:
 *   a group is 8 (kind 8) or 4 (kind 4) loads of 64 bytes, each holding 4 consecutive
 *           columns of each of the 16 blocks side by side (kind 4: the low nibbles hold
 *           columns 4q..4q+3, the high nibbles 16+4q..16+4q+3, GGUF's own bytes), so one
 *           vpdpbusd adds 4 columns to each block's dot product in its own int32 lane
 *           and the group ends with one conversion and one scaling for 16 blocks;
 *   the tail is in column order (kind 8), or (kind 4) each 4 blocks as 64 bytes whose
 *           low nibbles are blocks 0-1 and high nibbles blocks 2-3, a last lone pair as
 *           32 bytes (low nibbles its first 32 columns); its pairs of blocks are scaled
 *           one pair at a time.
 * Activations: each row of x is quantized per block of 32 to 16 bits against the
 * block's absolute maximum, xq = round(x * 32639 / max) = 256 xh + xl with xh, xl
 * int8, so a block's dot product with the codes is exact in int32 from two vpdpbusd
 * (unsigned codes x signed bytes). With sx the block's input scale,
 *   y = sum_b s_b sx_b D_b + z_b sx_b S_b,   D_b = sum c xq,  S_b = sum xq,
 * in float32. The input's rounding is 2^-16 of its block's largest element (bfloat16's
 * is 2^-9 of each element); everything after it is exact or float32.
 *
 * Each output (m, n) is computed from x's row m and w's row n alone, by the same
 * sequence of instructions whatever M, N, the thread count or the other rows are:
 * results are batch-invariant bit for bit. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define BLOCKQ_OK 1
#include <immintrin.h>
#else
#define BLOCKQ_OK 0
#endif

#define QMAX 32639.0f /* 256 * 127 + 127: xh and xl stay within int8 */
#ifndef PF_BYTES
#define PF_BYTES 2048 /* how far ahead in a weight row to prefetch */
#endif

int blockq_supported(void) { return BLOCKQ_OK; }

#if BLOCKQ_OK

/* One row of x [K] -> xh, xl [K] in the weights' order (the first 16 * (K / 512)
 * blocks in groups of 16, 4 columns of each block side by side; the rest in column
 * order); sx [K/32] the blocks' scales; xo [K/32] = sx * S. With a norm weight g [K],
 * the row is RMS-normalized first: g * (x / sqrt(mean(x^2) + eps)). */
static void prep_row(const float *x, int64_t K, const float *g, float eps, int8_t *xh, int8_t *xl, float *sx,
                     float *xo) {
    const int64_t grouped = K / 512 * 16;
    __m512 r = _mm512_set1_ps(1.0f);
    if (g) {
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < K; i += 16) ss = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), ss);
        r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)K + eps));
    }
    for (int64_t b = 0; b < K / 32; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        if (g) {
            v0 = _mm512_mul_ps(_mm512_loadu_ps(g + b * 32), _mm512_mul_ps(v0, r));
            v1 = _mm512_mul_ps(_mm512_loadu_ps(g + b * 32 + 16), _mm512_mul_ps(v1, r));
        }
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float check = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        if (!isfinite(amax) || !isfinite(check)) { /* NaN or inf in: NaN out, not a wrong number */
            sx[b] = xo[b] = NAN;
            v0 = v1 = _mm512_setzero_ps();
        }
        const __m512 inv = _mm512_set1_ps(amax > 0.0f && isfinite(amax) ? QMAX / amax : 0.0f);
        __m512i q[2] = {_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv))};
        for (int h = 0; h < 2; h++) {
            __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q[h], _mm512_set1_epi32(128)), 8);
            __m512i lo = _mm512_sub_epi32(q[h], _mm512_slli_epi32(hi, 8));
            if (b < grouped) { /* columns 4j..4j+3 of the group's 16 blocks side by side */
                uint8_t bh[16], bl[16];
                _mm_storeu_si128((__m128i *)bh, _mm512_cvtepi32_epi8(hi));
                _mm_storeu_si128((__m128i *)bl, _mm512_cvtepi32_epi8(lo));
                for (int j = 0; j < 4; j++) {
                    const int64_t at = (b / 16) * 512 + (4 * h + j) * 64 + (b % 16) * 4;
                    memcpy(xh + at, bh + 4 * j, 4);
                    memcpy(xl + at, bl + 4 * j, 4);
                }
            } else {
                _mm_storeu_si128((__m128i *)(xh + b * 32 + 16 * h), _mm512_cvtepi32_epi8(hi));
                _mm_storeu_si128((__m128i *)(xl + b * 32 + 16 * h), _mm512_cvtepi32_epi8(lo));
            }
        }
        if (isfinite(amax) && isfinite(check)) {
            sx[b] = amax / QMAX;
            xo[b] = sx[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
        }
    }
}

/* For the i-th pair of blocks in a chunk of 16: which of the chunk's 16 block scales
 * each of the pair's 16 int32 partial sums takes (8 lanes per block). */
static const int32_t LANES[8][16] = {
#define L(i) {2 * i, 2 * i, 2 * i, 2 * i, 2 * i, 2 * i, 2 * i, 2 * i, \
              2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1}
    L(0), L(1), L(2), L(3), L(4), L(5), L(6), L(7)
#undef L
};

/* One x row as the kernel reads it. */
typedef struct {
    const int8_t *xh, *xl;
    const float *sx, *xo;
} xrow;

/* y for NT (1 or 2) rows of w against MT (1 or 2) rows of x. Each (row of x, row of w)
 * has two float32 accumulators (even and odd pairs of blocks) and gets the same
 * instructions whatever the tile is: per chunk of 16 blocks, the offsets' term, then per
 * pair of blocks its 16 int32 partial sums times the blocks' scales (s sx, one
 * rounding); the lanes are summed at the end. */
static inline __attribute__((always_inline)) void dot_tile(const int kind, const int NT, const int MT, int64_t nb,
                                                           int64_t gstride, const uint8_t *w, const uint16_t *s,
                                                           const uint16_t *z, const xrow *x, float *y, int64_t N) {
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512 zdef = _mm512_set1_ps(kind == 4 ? -8.0f : -128.0f);
    __m512 acc[2][2][2], sv[2][2]; /* [w row][x row][pair parity] */
    for (int j = 0; j < NT; j++)
        for (int t = 0; t < MT; t++) acc[j][t][0] = acc[j][t][1] = _mm512_setzero_ps();
    /* the NT rows' groups lie interleaved, group by group (gstride bytes a group of all
     * NT rows), then each row's tail (tb bytes) */
    const int64_t bb = kind == 4 ? 16 : 32, groups = nb / 16, tb = (nb - 16 * groups) * bb;
    const uint8_t *wt = w + groups * gstride;

/* the pair of blocks b, b + 1 (of parity p: the pair's index in the row, mod 2) with
 * codes wv, scale lanes idx */
#define PAIR(wv_, b_, idx_, p_)                                                                                        \
    do {                                                                                                           \
        for (int t = 0; t < MT; t++) {                                                                             \
            const __m512i xh_ = _mm512_loadu_si512(x[t].xh + (b_) * 32), xl_ = _mm512_loadu_si512(x[t].xl + (b_) * 32); \
            for (int j = 0; j < NT; j++) {                                                                         \
                __m512i dh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv_[j], xh_);                            \
                __m512i d = _mm512_dpbusd_epi32(_mm512_slli_epi32(dh, 8), wv_[j], xl_);                           \
                acc[j][t][p_] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(idx_, sv[j][t]), acc[j][t][p_]); \
            }                                                                                                      \
        }                                                                                                          \
    } while (0)

    for (int64_t c = 0; c < nb; c += 16) {
        const int64_t left = nb - c < 16 ? nb - c : 16;
        const __mmask16 mk = (__mmask16)((1u << left) - 1u);
        __m512 sx[2], xo[2];
        for (int t = 0; t < MT; t++) {
            sx[t] = _mm512_maskz_loadu_ps(mk, x[t].sx + c);
            xo[t] = _mm512_maskz_loadu_ps(mk, x[t].xo + c);
        }
        for (int j = 0; j < NT; j++) {
            const __m512 sw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, s + j * nb + c));
            const __m512 zw = z ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, z + j * nb + c)) : _mm512_mul_ps(sw, zdef);
            for (int t = 0; t < MT; t++) {
                acc[j][t][0] = _mm512_fmadd_ps(zw, xo[t], acc[j][t][0]);
                sv[j][t] = _mm512_mul_ps(sw, sx[t]);
            }
        }
        int64_t b = c;
        if (left == 16) { /* a group: the dot products of its 16 blocks in the 16 lanes */
            for (int j = 0; j < NT; j++) {
                const uint8_t *wg = w + (c / 16) * gstride + j * 16 * bb;  /* row j's part of group c / 16 */
                __m512i W[8];
                if (kind == 4) {
                    for (int q = 0; q < 4; q++) {
                        _mm_prefetch((const char *)(wg + 64 * q + PF_BYTES), _MM_HINT_T0);
                        const __m512i raw = _mm512_loadu_si512(wg + 64 * q);
                        W[q] = _mm512_and_si512(raw, m4);
                        W[q + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                    }
                } else {
                    for (int q = 0; q < 8; q++) {
                        _mm_prefetch((const char *)(wg + 64 * q + PF_BYTES), _MM_HINT_T0);
                        W[q] = _mm512_loadu_si512(wg + 64 * q);
                    }
                }
                for (int t = 0; t < MT; t++) {
                    const int8_t *xh = x[t].xh + c * 32, *xl = x[t].xl + c * 32;
                    __m512i dh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), W[0], _mm512_loadu_si512(xh));
                    __m512i dl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), W[0], _mm512_loadu_si512(xl));
                    for (int q = 1; q < 8; q++) {
                        dh = _mm512_dpbusd_epi32(dh, W[q], _mm512_loadu_si512(xh + 64 * q));
                        dl = _mm512_dpbusd_epi32(dl, W[q], _mm512_loadu_si512(xl + 64 * q));
                    }
                    const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(dh, 8), dl);
                    acc[j][t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv[j][t], acc[j][t][0]);
                }
            }
        } else if (kind == 8) {
            for (; b < c + left; b += 2) {
                const __m512i idx = _mm512_loadu_si512(LANES[(b - c) / 2]);
                __m512i wv[2];
                for (int j = 0; j < NT; j++) {
                    _mm_prefetch((const char *)(wt + j * tb + (b - c) * 32 + PF_BYTES), _MM_HINT_T0);
                    wv[j] = _mm512_loadu_si512(wt + j * tb + (b - c) * 32);
                }
                if ((b / 2) & 1) PAIR(wv, b, idx, 1);
                else PAIR(wv, b, idx, 0);
            }
        } else {
            for (; b + 4 <= c + left; b += 4) {
                __m512i lo[2], hi[2];
                for (int j = 0; j < NT; j++) {
                    _mm_prefetch((const char *)(wt + j * tb + (b - c) * 16 + PF_BYTES), _MM_HINT_T0);
                    const __m512i raw = _mm512_loadu_si512(wt + j * tb + (b - c) * 16);
                    lo[j] = _mm512_and_si512(raw, m4);
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                }
                PAIR(lo, b, _mm512_loadu_si512(LANES[(b - c) / 2]), 0);
                PAIR(hi, b + 2, _mm512_loadu_si512(LANES[(b - c) / 2 + 1]), 1);
            }
            if (b < c + left) { /* the row's last pair, 32 bytes (an even one) */
                __m512i wv[2];
                for (int j = 0; j < NT; j++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(wt + j * tb + (b - c) * 16));
                    const __m256i m = _mm512_castsi512_si256(m4);
                    wv[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, m)),
                                               _mm256_and_si256(_mm256_srli_epi16(raw, 4), m), 1);
                }
                PAIR(wv, b, _mm512_loadu_si512(LANES[(b - c) / 2]), 0);
            }
        }
    }
#undef PAIR
    for (int j = 0; j < NT; j++)
        for (int t = 0; t < MT; t++) y[t * N + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][t][0], acc[j][t][1]));
}

#define TILE(K_, NT_, MT_) dot_tile(K_, NT_, MT_, nb, gstride, w, s, z, x + m, y + m * N, N)

/* Rows n .. n + NT of y (NT 1 or 2) against all M rows of x. */
static void dot_rows(int kind, int NT, int64_t nb, int64_t gstride, const uint8_t *w, const uint16_t *s,
                     const uint16_t *z, const xrow *x, int64_t M, float *y, int64_t N) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
        if (kind == 4) NT == 2 ? TILE(4, 2, 2) : TILE(4, 1, 2);
        else NT == 2 ? TILE(8, 2, 2) : TILE(8, 1, 2);
    }
    for (; m < M; m++) {
        if (kind == 4) NT == 2 ? TILE(4, 2, 1) : TILE(4, 1, 1);
        else NT == 2 ? TILE(8, 2, 1) : TILE(8, 1, 1);
    }
}

/* e^x for x <= 0, float32 to ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor
 * polynomial of degree 7, times 2^n. */
static inline __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f)); /* e^-103 is 0 in float32 */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#endif

/* One query's attention: out [H, D] = softmax(scale q k^T) v for q [H, D] over keys and
 * values [P, Hkv, D] (row-major), query head h reading key head h / (H / Hkv). D must
 * be a multiple of 16 and at most 256. Each head's result depends on its own q, the
 * keys and the values alone, by a fixed order of operations. Returns 0, or -1 when
 * this build has no kernel, the arguments are not its, or memory ran out. */
int blockq_attend1(const float *q, const float *k, const float *v, int64_t P, int64_t H, int64_t Hkv, int64_t D,
                   float scale, float *out) {
#if BLOCKQ_OK
    if (D % 16 != 0 || D > 256 || P < 1 || Hkv < 1 || H % Hkv != 0) return -1;
    float *scores = malloc((size_t)(H * (P + 16)) * sizeof(float));
    if (!scores) return -1;
    const int64_t nd = D / 16, group = H / Hkv, row = Hkv * D;
#pragma omp parallel for schedule(static) if (H * P * D >= 131072)
    for (int64_t h = 0; h < H; h++) {
        const float *qh = q + h * D, *kh = k + (h / group) * D, *vh = v + (h / group) * D;
        float *sc = scores + h * (P + 16);
        __m512 qv[16];
        for (int64_t i = 0; i < nd; i++) qv[i] = _mm512_mul_ps(_mm512_loadu_ps(qh + 16 * i), _mm512_set1_ps(scale));
        float mx = -INFINITY;
        int bad = 0;
        for (int64_t p = 0; p < P; p++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < nd; i++) acc = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(kh + p * row + 16 * i), acc);
            sc[p] = _mm512_reduce_add_ps(acc);
            bad |= isnan(sc[p]);
            mx = sc[p] > mx ? sc[p] : mx;
        }
        if (bad || !isfinite(mx)) { /* NaN or inf scores: NaN out, as softmax gives */
            for (int64_t i = 0; i < D; i++) out[h * D + i] = NAN;
            continue;
        }
        __m512 sum = _mm512_setzero_ps();
        for (int64_t p = 0; p < P; p += 16) {
            const __mmask16 mk = P - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (P - p)) - 1u);
            __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sc + p), _mm512_set1_ps(mx)));
            e = _mm512_maskz_mov_ps(mk, e);
            _mm512_mask_storeu_ps(sc + p, mk, e);
            sum = _mm512_add_ps(sum, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(sum);
        __m512 o[16];
        for (int64_t i = 0; i < nd; i++) o[i] = _mm512_setzero_ps();
        for (int64_t p = 0; p < P; p++) {
            const __m512 e = _mm512_set1_ps(sc[p]);
            for (int64_t i = 0; i < nd; i++) o[i] = _mm512_fmadd_ps(e, _mm512_loadu_ps(vh + p * row + 16 * i), o[i]);
        }
        for (int64_t i = 0; i < nd; i++) _mm512_storeu_ps(out + h * D + 16 * i, _mm512_mul_ps(o[i], _mm512_set1_ps(inv)));
    }
    free(scores);
    return 0;
#else
    (void)q, (void)k, (void)v, (void)P, (void)H, (void)Hkv, (void)D, (void)scale, (void)out;
    return -1;
#endif
}

/* y [M, N] = x [M, K] . w^T for kind 4 or 8 weights: codes [N, K/2] or [N, K] bytes,
 * scales fp16 bits [N, K/32], zeros fp16 bits [N, K/32] or NULL (the implied offsets);
 * norm [K] (or NULL): RMS-normalize each row of x first, with eps. K must be a multiple
 * of 64. Returns 0, or -1 when this build has no kernel, the arguments are not its, or
 * memory ran out. */
int blockq_linear(int kind, const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales,
                  const uint16_t *zeros, int64_t N, float *y, const float *norm, float eps) {
#if BLOCKQ_OK
    if (K % 64 != 0 || M < 1 || N < 1 || (kind != 4 && kind != 8)) return -1;
    const int64_t nb = K / 32, row_bytes = kind == 4 ? K / 2 : K;
    int8_t *xh = malloc((size_t)(M * K * 2));
    float *f = malloc((size_t)(M * nb * 2) * sizeof(float));
    xrow *rows = malloc((size_t)M * sizeof(xrow));
    if (!xh || !f || !rows) {
        free(xh), free(f), free(rows);
        return -1;
    }
    int8_t *xl = xh + M * K;
    float *sx = f, *xo = f + M * nb;
#pragma omp parallel for schedule(static) if (M * K >= 32768)
    for (int64_t m = 0; m < M; m++)
        prep_row(x + m * K, K, norm, eps, xh + m * K, xl + m * K, sx + m * nb, xo + m * nb);
    for (int64_t m = 0; m < M; m++) rows[m] = (xrow){xh + m * K, xl + m * K, sx + m * nb, xo + m * nb};
    /* Rows of w in pairs (the last alone when N is odd), each pair's two rows interleaved
     * group by group (blockq.py, kernel_layout): a pair is read as one stream, and each
     * load of x serves both rows. */
    const int64_t gb = (kind == 4 ? 16 : 32) * 16, pairs = N / 2;
#pragma omp parallel for schedule(static) if (M * N * K >= 262144)
    for (int64_t i = 0; i < pairs + N % 2; i++) {
        const int64_t n = 2 * i;
        const int nt = n + 1 < N ? 2 : 1;
        dot_rows(kind, nt, nb, nt * gb, codes + n * row_bytes, scales + n * nb, zeros ? zeros + n * nb : NULL, rows, M,
                 y + n, N);
    }
    free(xh), free(f), free(rows);
    return 0;
#else
    (void)kind, (void)x, (void)M, (void)K, (void)codes, (void)scales, (void)zeros, (void)N, (void)y, (void)norm, (void)eps;
    return -1;
#endif
}
