/* Direct stride-1 convolutions over few-channel maps, for the attention branches on CPU (san/kernels/native.py).

   oneDNN pads a conv's input and output channels into blocks of 16, so CBAM's 2->1 7x7 conv and BAM's 1->1 dilated
   3x3 convs cost what 16- or 256-times larger convs would. These loops do only the real taps: each block of 8
   output columns (4 rows at a time) accumulates in registers over every tap of a zero-padded copy of the input,
   which the kernels make themselves from the input's own strides (any layout).

   Results are deterministic for a given input: the batch is split into a fixed number of parts however many
   threads run, and the weight gradient's per-part sums are added in order.

   Below the convolutions: CBAM's, BAM's and SAN's full-size passes (each walks a map a few times where torch's
   formulation makes a dozen to thirty passes), the few-channel conv -> batch norm -> activation chains of BAM's
   spatial branch, and BAM as one call each way. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));
#define LANES 8
#define ROWS 6

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

typedef struct {
    long n, c, h, w; /* strides of the input, in elements */
} strides4;

/* The zero-padded copy of sample n: (C, H + 2ph, W + 2pw), contiguous. */
static void pad_sample(const float *x, strides4 s, float *xp, long n, long C, long H, long W, long ph, long pw) {
    long Hp = H + 2 * ph, Wp = W + 2 * pw;
    for (long c = 0; c < C; c++) {
        float *dst = xp + c * Hp * Wp;
        memset(dst, 0, sizeof(float) * ph * Wp);
        memset(dst + (ph + H) * Wp, 0, sizeof(float) * ph * Wp);
        for (long h = 0; h < H; h++) {
            float *row = dst + (ph + h) * Wp;
            const float *src = x + n * s.n + c * s.c + h * s.h;
            for (long i = 0; i < pw; i++) row[i] = row[pw + W + i] = 0.0f;
            long w = 0;
            if (s.w == 1) /* rows of a few dozen floats: vector moves, not a call to memcpy per row */
                for (; w + LANES <= W; w += LANES) store8(row + pw + w, load8(src + w));
            for (; w < W; w++) row[pw + w] = src[w * s.w];
        }
    }
}

static inline float row_dot(const float *a, const float *b, long T);
static void san_conv2d_weight_grad_padded(const float *g, const float *x, strides4 s, float *scratch, float *partial,
                                          long N, long Cin, long H, long W, long Cout, long KH, long KW, long ph,
                                          long pw, long dh, long dw, long parts);

/* Output blocks of WIDTH columns x ROWS rows accumulated in registers over every tap; a row's last block overlaps
   the one before it. Wide maps take 16-column blocks (one AVX-512 register, two AVX ones). */
#define DEFINE_FORWARD_BLOCKS(NAME, VEC, WIDTH)                                                                     \
    static void NAME(const float *xp, const float *wc, float b, float *y, long Cin, long Hp, long Wp, long KH,      \
                     long KW, long Ho, long Wo, long dh, long dw) {                                                 \
        for (long oh0 = 0; oh0 < Ho; oh0 += ROWS) {                                                                 \
            long rows = Ho - oh0 < ROWS ? Ho - oh0 : ROWS;                                                          \
            for (long ow0 = 0; ow0 < Wo; ow0 += WIDTH) {                                                            \
                long ow = ow0 + WIDTH <= Wo ? ow0 : Wo - WIDTH;                                                     \
                VEC acc[ROWS];                                                                                      \
                for (long r = 0; r < ROWS; r++) acc[r] = (VEC){0} + b;                                              \
                for (long ci = 0; ci < Cin; ci++)                                                                   \
                    for (long kh = 0; kh < KH; kh++)                                                                \
                        for (long kw = 0; kw < KW; kw++) {                                                          \
                            float tap = wc[(ci * KH + kh) * KW + kw];                                               \
                            const float *src = xp + (ci * Hp + oh0 + kh * dh) * Wp + ow + kw * dw;                  \
                            if (rows == ROWS)                                                                       \
                                for (long r = 0; r < ROWS; r++) {                                                   \
                                    VEC v;                                                                          \
                                    memcpy(&v, src + r * Wp, sizeof v);                                             \
                                    acc[r] += tap * v;                                                              \
                                }                                                                                   \
                            else                                                                                    \
                                for (long r = 0; r < rows; r++) {                                                   \
                                    VEC v;                                                                          \
                                    memcpy(&v, src + r * Wp, sizeof v);                                             \
                                    acc[r] += tap * v;                                                              \
                                }                                                                                   \
                        }                                                                                           \
                for (long r = 0; r < rows; r++) memcpy(y + (oh0 + r) * Wo + ow, &acc[r], sizeof acc[r]);            \
            }                                                                                                       \
        }                                                                                                           \
    }

DEFINE_FORWARD_BLOCKS(forward_blocks8, v8, LANES)
DEFINE_FORWARD_BLOCKS(forward_blocks16, v16, (2 * LANES))

/* One sample, one output channel: y = b + sum over taps of w * xp (xp: this sample's padded input). */
static void forward_channel(const float *xp, const float *wc, float b, float *y, long Cin, long Hp, long Wp, long KH,
                            long KW, long Ho, long Wo, long dh, long dw) {
    if (Wo < LANES) {
        for (long oh = 0; oh < Ho; oh++)
            for (long ow = 0; ow < Wo; ow++) {
                float sum = b;
                for (long ci = 0; ci < Cin; ci++)
                    for (long kh = 0; kh < KH; kh++)
                        for (long kw = 0; kw < KW; kw++)
                            sum += wc[(ci * KH + kh) * KW + kw] * xp[(ci * Hp + oh + kh * dh) * Wp + ow + kw * dw];
                y[oh * Wo + ow] = sum;
            }
        return;
    }
    if (Wo >= 2 * LANES)
        forward_blocks16(xp, wc, b, y, Cin, Hp, Wp, KH, KW, Ho, Wo, dh, dw);
    else
        forward_blocks8(xp, wc, b, y, Cin, Hp, Wp, KH, KW, Ho, Wo, dh, dw);
}

/* y (N, Cout, Ho, Wo) contiguous = conv(x, w) + bias, stride 1, zero padding (ph, pw), dilation (dh, dw).
   scratch: N * Cin * (H + 2ph) * (W + 2pw) floats. bias may be NULL. */
void san_conv2d_forward(const float *x, long sn, long sc, long sh, long sw, const float *w, const float *bias,
                        float *scratch, float *y, long N, long Cin, long H, long W, long Cout, long KH, long KW,
                        long ph, long pw, long dh, long dw) {
    strides4 s = {sn, sc, sh, sw};
    long Hp = H + 2 * ph, Wp = W + 2 * pw, Ho = Hp - dh * (KH - 1), Wo = Wp - dw * (KW - 1);
    if (KH == 1 && KW == 1 && ph == 0 && pw == 0 && sw == 1 && sh == W) { /* 1x1 over rows: no padded copy */
        long P = H * W;
#pragma omp parallel for schedule(static) if (N * Cout * P * Cin > 200000)
        for (long n = 0; n < N; n++)
            for (long co = 0; co < Cout; co++) {
                float *yp = y + (n * Cout + co) * P, b = bias ? bias[co] : 0.0f;
                for (long p = 0; p < P; p++) yp[p] = b;
                for (long ci = 0; ci < Cin; ci++) {
                    const float *xp = x + n * sn + ci * sc;
                    float tap = w[co * Cin + ci];
                    for (long p = 0; p < P; p++) yp[p] += tap * xp[p];
                }
            }
        return;
    }
#pragma omp parallel for schedule(static) if (N * Cout * Ho * Wo * Cin * KH * KW > 200000)
    for (long n = 0; n < N; n++) {
        float *xp = scratch + n * Cin * Hp * Wp;
        pad_sample(x, s, xp, n, Cin, H, W, ph, pw);
        for (long co = 0; co < Cout; co++)
            forward_channel(xp, w + co * Cin * KH * KW, bias ? bias[co] : 0.0f, y + (n * Cout + co) * Ho * Wo, Cin,
                            Hp, Wp, KH, KW, Ho, Wo, dh, dw);
    }
}

/* sums[k] += sum over rows and columns of g * x shifted by (kw0 + k) dw, for k < count: one kernel row's weight
   gradients from one sample, its gradient rows (Ho x Wo) g and padded input rows (stride Wp) x. The gradient
   block is loaded once for every tap of the row; a row's last block overlaps the one before it and is masked. */
#define KW_CHUNK 8
#define DEFINE_WEIGHT_GRAD_ROW(NAME, VEC, WIDTH, COUNT)                                                             \
    static void NAME(const float *g, const float *x, long Ho, long Wo, long Wp, long kw0, long count, long dw,      \
                     float *sums) {                                                                                 \
        VEC mask, acc[COUNT];                                                                                       \
        long tail = Wo % WIDTH;                                                                                     \
        (void)count; /* COUNT taps: a constant, so the accumulators stay in registers */                            \
        for (long l = 0; l < WIDTH; l++) mask[l] = (tail == 0 || l >= WIDTH - tail) ? 1.0f : 0.0f;                   \
        for (long k = 0; k < COUNT; k++) acc[k] = (VEC){0};                                                         \
        for (long oh = 0; oh < Ho; oh++)                                                                            \
            for (long ow0 = 0; ow0 < Wo; ow0 += WIDTH) {                                                            \
                long ow = ow0 + WIDTH <= Wo ? ow0 : Wo - WIDTH;                                                     \
                VEC gv, xv;                                                                                         \
                memcpy(&gv, g + oh * Wo + ow, sizeof gv);                                                           \
                if (ow != ow0) gv *= mask;                                                                          \
                const float *xrow = x + oh * Wp + ow + kw0 * dw;                                                    \
                for (long k = 0; k < COUNT; k++) {                                                                  \
                    memcpy(&xv, xrow + k * dw, sizeof xv);                                                          \
                    acc[k] += gv * xv;                                                                              \
                }                                                                                                   \
            }                                                                                                       \
        for (long k = 0; k < COUNT; k++) {                                                                          \
            float sum = 0.0f;                                                                                       \
            for (long l = 0; l < WIDTH; l++) sum += acc[k][l];                                                      \
            sums[k] += sum;                                                                                         \
        }                                                                                                           \
    }

/* one kernel-row chunk of 1 to KW_CHUNK taps, for 8- and 16-column blocks */
#define DEFINE_WEIGHT_GRAD_ROWS(VEC, WIDTH, SUFFIX)                                                                 \
    DEFINE_WEIGHT_GRAD_ROW(weight_grad_##SUFFIX##_1, VEC, WIDTH, 1)                                                 \
    DEFINE_WEIGHT_GRAD_ROW(weight_grad_##SUFFIX##_2, VEC, WIDTH, 2)                                                 \
    DEFINE_WEIGHT_GRAD_ROW(weight_grad_##SUFFIX##_3, VEC, WIDTH, 3)                                                 \
    DEFINE_WEIGHT_GRAD_ROW(weight_grad_##SUFFIX##_4, VEC, WIDTH, 4)                                                 \
    DEFINE_WEIGHT_GRAD_ROW(weight_grad_##SUFFIX##_5, VEC, WIDTH, 5)                                                 \
    DEFINE_WEIGHT_GRAD_ROW(weight_grad_##SUFFIX##_6, VEC, WIDTH, 6)                                                 \
    DEFINE_WEIGHT_GRAD_ROW(weight_grad_##SUFFIX##_7, VEC, WIDTH, 7)                                                 \
    DEFINE_WEIGHT_GRAD_ROW(weight_grad_##SUFFIX##_8, VEC, WIDTH, 8)

DEFINE_WEIGHT_GRAD_ROWS(v8, LANES, row8)
DEFINE_WEIGHT_GRAD_ROWS(v16, (2 * LANES), row16)

typedef void (*weight_grad_row)(const float *, const float *, long, long, long, long, long, long, float *);
static const weight_grad_row WEIGHT_GRAD_ROW8[KW_CHUNK] = {
    weight_grad_row8_1, weight_grad_row8_2, weight_grad_row8_3, weight_grad_row8_4,
    weight_grad_row8_5, weight_grad_row8_6, weight_grad_row8_7, weight_grad_row8_8};
static const weight_grad_row WEIGHT_GRAD_ROW16[KW_CHUNK] = {
    weight_grad_row16_1, weight_grad_row16_2, weight_grad_row16_3, weight_grad_row16_4,
    weight_grad_row16_5, weight_grad_row16_6, weight_grad_row16_7, weight_grad_row16_8};

static void weight_grad_row1(const float *g, const float *x, long Ho, long Wo, long Wp, long kw0, long count, long dw,
                             float *sums) {
    for (long k = 0; k < count; k++) {
        float sum = 0.0f;
        for (long oh = 0; oh < Ho; oh++)
            for (long ow = 0; ow < Wo; ow++) sum += g[oh * Wo + ow] * x[oh * Wp + ow + (kw0 + k) * dw];
        sums[k] += sum;
    }
}

/* gw (Cout, Cin, KH, KW) = sum over n, oh, ow of g[n, co, oh, ow] * xpad[n, ci, oh + kh dh, ow + kw dw]: the weight
   gradient of san_conv2d_forward. g: (N, Cout, Ho, Wo) contiguous. scratch as there; partial: parts * Cout * Cin *
   KH * KW floats. */
void san_conv2d_weight_grad(const float *g, const float *x, long sn, long sc, long sh, long sw, float *scratch,
                            float *partial, float *gw, long N, long Cin, long H, long W, long Cout, long KH, long KW,
                            long ph, long pw, long dh, long dw, long parts) {
    strides4 s = {sn, sc, sh, sw};
    long total = Cout * Cin * KH * KW;
    if (KH == 1 && KW == 1 && ph == 0 && pw == 0 && sw == 1 && sh == W) { /* 1x1: a dot product per tap and sample */
        long P = H * W;
#pragma omp parallel for schedule(static) if (N * Cout * P * Cin > 200000)
        for (long part = 0; part < parts; part++) {
            float *sums = partial + part * total;
            for (long t = 0; t < total; t++) sums[t] = 0.0f;
            for (long n = N * part / parts; n < N * (part + 1) / parts; n++)
                for (long co = 0; co < Cout; co++)
                    for (long ci = 0; ci < Cin; ci++)
                        sums[co * Cin + ci] += row_dot(g + (n * Cout + co) * P, x + n * sn + ci * sc, P);
        }
    } else {
        san_conv2d_weight_grad_padded(g, x, s, scratch, partial, N, Cin, H, W, Cout, KH, KW, ph, pw, dh, dw, parts);
    }
    for (long t = 0; t < total; t++) {
        double sum = 0.0;
        for (long part = 0; part < parts; part++) sum += partial[part * total + t];
        gw[t] = (float)sum;
    }
}

static void san_conv2d_weight_grad_padded(const float *g, const float *x, strides4 s, float *scratch, float *partial,
                                          long N, long Cin, long H, long W, long Cout, long KH, long KW, long ph,
                                          long pw, long dh, long dw, long parts) {
    long Hp = H + 2 * ph, Wp = W + 2 * pw, Ho = Hp - dh * (KH - 1), Wo = Wp - dw * (KW - 1);
    long total = Cout * Cin * KH * KW;
    const weight_grad_row *rows = Wo >= 2 * LANES ? WEIGHT_GRAD_ROW16 : Wo >= LANES ? WEIGHT_GRAD_ROW8 : NULL;
#pragma omp parallel for schedule(static) if (N * Cout * Ho * Wo * Cin * KH * KW > 200000)
    for (long part = 0; part < parts; part++) {
        float *sums = partial + part * total;
        for (long t = 0; t < total; t++) sums[t] = 0.0f;
        for (long n = N * part / parts; n < N * (part + 1) / parts; n++) {
            float *xp = scratch + n * Cin * Hp * Wp;
            pad_sample(x, s, xp, n, Cin, H, W, ph, pw);
            for (long co = 0; co < Cout; co++)
                for (long ci = 0; ci < Cin; ci++)
                    for (long kh = 0; kh < KH; kh++)
                        for (long kw0 = 0; kw0 < KW; kw0 += KW_CHUNK) {
                            long count = KW - kw0 < KW_CHUNK ? KW - kw0 : KW_CHUNK;
                            weight_grad_row row = rows ? rows[count - 1] : weight_grad_row1;
                            row(g + (n * Cout + co) * Ho * Wo, xp + (ci * Hp + kh * dh) * Wp, Ho, Wo, Wp, kw0, count,
                                dw, sums + ((co * Cin + ci) * KH + kh) * KW + kw0);
                        }
        }
    }
}

/* ---- CBAM's full-size passes (san/kernels/cbam_op.py) -------------------------------------------------------------

   x, the output and their gradients are (N, C, H, W), NCHW-contiguous (cl = 0) or channels-last (cl = 1); P = H W.
   Each pass walks a sample in tiles of up to TILE positions copied to a (C, TILE) buffer, so every per-position loop
   runs over contiguous vectors whatever the layout (lanes past the tile's end are computed on stale values and never
   stored or summed). mc: the channel mask (N, C); ms: the spatial mask (N, P); pooled and grad_pooled: (N, 2, P),
   the channel max then the channel mean of s = x mc. */

#define TILE 128
typedef int vi8 __attribute__((vector_size(32)));

static inline v8 splat8(float f) { return (v8){0} + f; }
static inline v8 select8(vi8 m, v8 a, v8 b) { return (v8)(((vi8)a & m) | ((vi8)b & ~m)); }
static inline v8 max8(v8 a, v8 b) { return select8(a > b, a, b); }
static inline v8 ones8(vi8 m) { return (v8)((vi8)splat8(1.0f) & m); }

static float *new_tile(long C) { return calloc((size_t)C * TILE, sizeof(float)); }

/* Channels-last tiles are transposed with the CPU's gathers (2.3x the scalar loop at C = 6) and scatters (1.4x)
   where it has them. */
static void load_tile(const float *x, long cl, long n, long C, long P, long p0, long T, float *tile) {
    if (cl) {
        const float *src = x + (n * P + p0) * C;
        long t0 = 0;
#if defined(__AVX2__)
        __m256i index = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)C));
        for (; t0 + 8 <= T; t0 += 8)
            for (long c = 0; c < C; c++)
                _mm256_storeu_ps(tile + c * TILE + t0, _mm256_i32gather_ps(src + t0 * C + c, index, 4));
#endif
        for (long c = 0; c < C; c++)
            for (long t = t0; t < T; t++) tile[c * TILE + t] = src[t * C + c];
    } else {
        for (long c = 0; c < C; c++) memcpy(tile + c * TILE, x + (n * C + c) * P + p0, sizeof(float) * T);
    }
}

static void store_tile(float *y, long cl, long n, long C, long P, long p0, long T, const float *tile) {
    if (cl) {
        float *dst = y + (n * P + p0) * C;
        long t0 = 0;
#if defined(__AVX512F__)
        __m512i index = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)C));
        for (; t0 + 16 <= T; t0 += 16)
            for (long c = 0; c < C; c++)
                _mm512_i32scatter_ps(dst + t0 * C + c, index, _mm512_loadu_ps(tile + c * TILE + t0), 4);
#endif
        for (long c = 0; c < C; c++)
            for (long t = t0; t < T; t++) dst[t * C + c] = tile[c * TILE + t];
    } else {
        for (long c = 0; c < C; c++) memcpy(y + (n * C + c) * P + p0, tile + c * TILE, sizeof(float) * T);
    }
}

/* Per position of a tile (TILE lanes): the channel max of s = x mc, how many channels reach it, the channel mean. */
static void channel_pool(const float *xt, const float *mc, long C, long T, float *top, float *ties, float *mean) {
    for (long t = 0; t < T; t += LANES) {
        v8 high = splat8(-INFINITY), sum = {0}, count = {0};
        for (long c = 0; c < C; c++) {
            v8 s = load8(xt + c * TILE + t) * mc[c];
            high = max8(s, high);
            sum += s;
        }
        for (long c = 0; c < C; c++) count += ones8(load8(xt + c * TILE + t) * mc[c] == high);
        store8(top + t, high);
        store8(ties + t, count);
        store8(mean + t, sum / (float)C);
    }
}

/* The sums over a row's first T lanes of a and of a b; the max of a; the count of a == b0. */
static inline float row_sum(const float *a, long T) {
    v8 acc = {0};
    long t = 0;
    for (; t + LANES <= T; t += LANES) acc += load8(a + t);
    float sum = 0.0f;
    for (long l = 0; l < LANES; l++) sum += acc[l];
    for (; t < T; t++) sum += a[t];
    return sum;
}

static inline float row_max(const float *a, long T, float high) {
    v8 acc = splat8(high);
    long t = 0;
    for (; t + LANES <= T; t += LANES) acc = max8(load8(a + t), acc);
    for (long l = 0; l < LANES; l++) high = acc[l] > high ? acc[l] : high;
    for (; t < T; t++) high = a[t] > high ? a[t] : high;
    return high;
}

static inline float row_dot(const float *a, const float *b, long T) {
    v8 acc = {0};
    long t = 0;
    for (; t + LANES <= T; t += LANES) acc += load8(a + t) * load8(b + t);
    float sum = 0.0f;
    for (long l = 0; l < LANES; l++) sum += acc[l];
    for (; t < T; t++) sum += a[t] * b[t];
    return sum;
}

static inline float row_count(const float *a, float value, long T) {
    v8 acc = {0};
    long t = 0;
    for (; t + LANES <= T; t += LANES) acc += ones8(load8(a + t) == value);
    float count = 0.0f;
    for (long l = 0; l < LANES; l++) count += acc[l];
    for (; t < T; t++) count += a[t] == value ? 1.0f : 0.0f;
    return count;
}

/* avg, top (N, C): the mean and max of x over positions. */
static void san_channel_descriptors(const float *x, long cl, long N, long C, long P, float *avg, float *top) {
#pragma omp parallel
    {
        float *tile = new_tile(C);
        double *sum = malloc(sizeof(double) * C);
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++) {
            for (long c = 0; c < C; c++) sum[c] = 0.0, top[n * C + c] = -INFINITY;
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                load_tile(x, cl, n, C, P, p0, T, tile);
                for (long c = 0; c < C; c++) {
                    sum[c] += row_sum(tile + c * TILE, T);
                    top[n * C + c] = row_max(tile + c * TILE, T, top[n * C + c]);
                }
            }
            for (long c = 0; c < C; c++) avg[n * C + c] = (float)(sum[c] / (double)P);
        }
        free(tile);
        free(sum);
    }
}

/* pooled (N, 2, P) from x and mc. */
void san_cbam_pool(const float *x, long cl, const float *mc, long N, long C, long P, float *pooled) {
#pragma omp parallel
    {
        float *tile = new_tile(C), top[TILE], ties[TILE], mean[TILE];
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                load_tile(x, cl, n, C, P, p0, T, tile);
                channel_pool(tile, mc + n * C, C, T, top, ties, mean);
                memcpy(pooled + 2 * n * P + p0, top, sizeof(float) * T);
                memcpy(pooled + (2 * n + 1) * P + p0, mean, sizeof(float) * T);
            }
        free(tile);
    }
}

/* out = (x mc) ms, in x's layout. */
void san_cbam_apply(const float *x, long cl, const float *mc, const float *ms, long N, long C, long P, float *out) {
#pragma omp parallel
    {
        float *tile = new_tile(C), m[TILE] = {0};
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                load_tile(x, cl, n, C, P, p0, T, tile);
                memcpy(m, ms + n * P + p0, sizeof(float) * T);
                for (long c = 0; c < C; c++) {
                    float channel = mc[n * C + c];
                    for (long t = 0; t < T; t += LANES)
                        store8(tile + c * TILE + t, load8(tile + c * TILE + t) * channel * load8(m + t));
                }
                store_tile(out, cl, n, C, P, p0, T, tile);
            }
        free(tile);
    }
}

/* u = [s = channel max] grad_max / ties + grad_mean / C + g ms: the gradient reaching s (into gtile). */
static void channel_pool_grad(const float *xt, float *gtile, const float *mc, const float *ms, const float *gmax,
                              const float *gmean, long C, long T) {
    float top[TILE], ties[TILE], mean[TILE], share[TILE], spread[TILE], m[TILE] = {0};
    channel_pool(xt, mc, C, T, top, ties, mean);
    for (long t = 0; t < T; t++) share[t] = gmax[t] / ties[t], spread[t] = gmean[t] / (float)C, m[t] = ms[t];
    for (long t = T; t < TILE; t++) share[t] = spread[t] = 0.0f;
    for (long c = 0; c < C; c++)
        for (long t = 0; t < T; t += LANES) {
            v8 is_max = ones8(load8(xt + c * TILE + t) * mc[c] == load8(top + t));
            v8 u = is_max * load8(share + t) + load8(spread + t) + load8(gtile + c * TILE + t) * load8(m + t);
            store8(gtile + c * TILE + t, u);
        }
}

/* Sample n's positions p0 .. p0 + T: x into tile, and into gtile (from g) the gradient u reaching s = x mc
   (channel_pool_grad) — how both of CBAM's backward passes over x start each tile. */
static void pool_grad_tile(const float *x, const float *g, long cl, long n, long C, long P, long p0, long T,
                           const float *mc, const float *ms, const float *grad_pooled, float *tile, float *gtile) {
    load_tile(x, cl, n, C, P, p0, T, tile);
    load_tile(g, cl, n, C, P, p0, T, gtile);
    channel_pool_grad(tile, gtile, mc + n * C, ms + n * P + p0, grad_pooled + 2 * n * P + p0,
                      grad_pooled + (2 * n + 1) * P + p0, C, T);
}

/* ---- CBAM's passes, the kernels of its registered op (san/kernels/cbam_op.py) -------------------------------------
   Forward: san_cbam_channel (descriptors and MLP), san_cbam_pool, san_stage_forward (conv -> BN -> sigmoid),
   san_cbam_apply. Backward: san_cbam_backward_spatial, san_stage_backward, san_cbam_backward_mask (with the MLP's
   backward), san_cbam_backward_input. */

/* CBAM's channel attention for one sample from its descriptors avg and top (C): hidden (2, K) = relu(w1 d + b1) for
   d = avg, top; mc (C) = sigmoid(w2 h_avg + b2 + w2 h_top + b2). w1: (K, C), w2: (C, K); biases may be NULL. */
static void cbam_mlp(const float *avg, const float *top, const float *w1, const float *b1, const float *w2,
                     const float *b2, long C, long K, float *hidden_avg, float *hidden_top, float *mc) {
    for (long j = 0; j < K; j++) {
        float a = b1 ? b1[j] : 0.0f, t = a;
        for (long c = 0; c < C; c++) a += w1[j * C + c] * avg[c], t += w1[j * C + c] * top[c];
        hidden_avg[j] = a > 0.0f ? a : 0.0f;
        hidden_top[j] = t > 0.0f ? t : 0.0f;
    }
    for (long c = 0; c < C; c++) {
        float a = b2 ? b2[c] : 0.0f, t = a;
        for (long j = 0; j < K; j++) a += w2[c * K + j] * hidden_avg[j], t += w2[c * K + j] * hidden_top[j];
        mc[c] = 1.0f / (1.0f + expf(-(a + t)));
    }
}

/* descriptors (2N, C): the mean of x over positions, then its max; hidden (2N, K) and mc (N, C) from the MLP. */
void san_cbam_channel(const float *x, long cl, const float *w1, const float *b1, const float *w2, const float *b2,
                      long N, long C, long P, long K, float *descriptors, float *hidden, float *mc) {
    san_channel_descriptors(x, cl, N, C, P, descriptors, descriptors + N * C);
    for (long n = 0; n < N; n++)
        cbam_mlp(descriptors + n * C, descriptors + (N + n) * C, w1, b1, w2, b2, C, K, hidden + n * K,
                 hidden + (N + n) * K, mc + n * C);
}

/* Backward, first pass: pooled (recomputed) and grad_spatial (N, P) = sum_c s g. g in x's layout. */
void san_cbam_backward_spatial(const float *x, const float *g, long cl, const float *mc, long N, long C, long P,
                               float *pooled, float *grad_spatial) {
#pragma omp parallel
    {
        float *tile = new_tile(C), *gtile = new_tile(C), top[TILE], ties[TILE], mean[TILE], gs[TILE];
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                load_tile(x, cl, n, C, P, p0, T, tile);
                load_tile(g, cl, n, C, P, p0, T, gtile);
                channel_pool(tile, mc + n * C, C, T, top, ties, mean);
                for (long t = 0; t < T; t += LANES) {
                    v8 sum = {0};
                    for (long c = 0; c < C; c++)
                        sum += load8(tile + c * TILE + t) * mc[n * C + c] * load8(gtile + c * TILE + t);
                    store8(gs + t, sum);
                }
                memcpy(pooled + 2 * n * P + p0, top, sizeof(float) * T);
                memcpy(pooled + (2 * n + 1) * P + p0, mean, sizeof(float) * T);
                memcpy(grad_spatial + n * P + p0, gs, sizeof(float) * T);
            }
        free(tile);
        free(gtile);
    }
}

/* The MLP's backward for one sample, from d = dL/dmc (C): adds the parameters' gradients to grads (w1 K*C, b1 K,
   w2 C*K, b2 C) and gives the descriptors' gradients grad_avg, grad_top (C). */
static void cbam_mlp_backward(const float *d, const float *mc, const float *avg, const float *top,
                              const float *hidden_avg, const float *hidden_top, const float *w1, const float *w2,
                              long C, long K, float *grads, float *grad_avg, float *grad_top) {
    float *gw1 = grads, *gb1 = grads + K * C, *gw2 = gb1 + K, *gb2 = gw2 + C * K;
    for (long c = 0; c < C; c++) {
        float logit = d[c] * (1.0f - mc[c]) * mc[c]; /* both halves of the MLP's output get it */
        for (long j = 0; j < K; j++) gw2[c * K + j] += logit * hidden_avg[j] + logit * hidden_top[j];
        gb2[c] += logit + logit;
        grad_avg[c] = grad_top[c] = 0.0f;
    }
    for (long j = 0; j < K; j++) {
        float a = 0.0f;
        for (long c = 0; c < C; c++) a += d[c] * (1.0f - mc[c]) * mc[c] * w2[c * K + j];
        float ga = hidden_avg[j] > 0.0f ? a : 0.0f, gt = hidden_top[j] > 0.0f ? a : 0.0f;
        for (long c = 0; c < C; c++) {
            gw1[j * C + c] += ga * avg[c] + gt * top[c];
            grad_avg[c] += ga * w1[j * C + c];
            grad_top[c] += gt * w1[j * C + c];
        }
        gb1[j] += ga + gt;
    }
}

/* Backward, second pass: d = dL/dmc = sum_p u x and, per sample, the channel MLP's backward: grad_avg (N, C), the
   gradient of the descriptors' max divided among the positions that reach it, top_share (N, C), and the MLP's
   parameter gradients per sample, partial (N, 2 K C + K + C), summed in order by the caller. */
void san_cbam_backward_mask(const float *x, const float *g, long cl, const float *mc, const float *ms,
                            const float *grad_pooled, const float *descriptors, const float *hidden, const float *w1,
                            const float *w2, long N, long C, long P, long K, float *grad_avg, float *top_share,
                            float *partial) {
    const float *avg = descriptors, *top = descriptors + N * C;
#pragma omp parallel
    {
        float *tile = new_tile(C), *gtile = new_tile(C), *d = malloc(sizeof(float) * C);
        float *ties = malloc(sizeof(float) * C), *grad_top = malloc(sizeof(float) * C);
        double *sum = malloc(sizeof(double) * C);
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++) {
            for (long c = 0; c < C; c++) sum[c] = 0.0, ties[c] = 0.0f;
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                pool_grad_tile(x, g, cl, n, C, P, p0, T, mc, ms, grad_pooled, tile, gtile);
                for (long c = 0; c < C; c++) {
                    sum[c] += row_dot(gtile + c * TILE, tile + c * TILE, T);
                    ties[c] += row_count(tile + c * TILE, top[n * C + c], T);
                }
            }
            for (long c = 0; c < C; c++) d[c] = (float)sum[c];
            float *grads = partial + n * (2 * K * C + K + C);
            for (long i = 0; i < 2 * K * C + K + C; i++) grads[i] = 0.0f;
            cbam_mlp_backward(d, mc + n * C, avg + n * C, top + n * C, hidden + n * K, hidden + (N + n) * K, w1, w2,
                              C, K, grads, grad_avg + n * C, grad_top);
            for (long c = 0; c < C; c++) top_share[n * C + c] = grad_top[c] / ties[c];
        }
        free(tile);
        free(gtile);
        free(d);
        free(ties);
        free(grad_top);
        free(sum);
    }
}

/* Backward, last pass: grad_x = grad_avg / P + u mc + [x = top] top_share, in x's layout. */
void san_cbam_backward_input(const float *x, const float *g, long cl, const float *mc, const float *ms,
                             const float *grad_pooled, const float *top, const float *grad_avg,
                             const float *top_share, long N, long C, long P, float *grad_x) {
#pragma omp parallel
    {
        float *tile = new_tile(C), *gtile = new_tile(C);
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                pool_grad_tile(x, g, cl, n, C, P, p0, T, mc, ms, grad_pooled, tile, gtile);
                for (long c = 0; c < C; c++) {
                    float base = grad_avg[n * C + c] / (float)P, m = mc[n * C + c];
                    float high = top[n * C + c], share = top_share[n * C + c];
                    for (long t = 0; t < T; t += LANES) {
                        v8 is_top = ones8(load8(tile + c * TILE + t) == high);
                        v8 u = load8(gtile + c * TILE + t);
                        store8(gtile + c * TILE + t, base + u * m + is_top * share);
                    }
                }
                store_tile(grad_x, cl, n, C, P, p0, T, gtile);
            }
        free(tile);
        free(gtile);
    }
}

/* ---- BAM's full-size passes (san/kernels/bam_op.py) ---------------------------------------------------------------

   Layouts and tiles as CBAM's. The mask M = sigmoid(c + s) (sum) or sigmoid(c s) (product) of the channel logits c
   (N, C) and the spatial logits s (N, P) is full-size, so it is never stored: each pass computes it per tile. */

/* exp in float32 vectors (Cephes' expf: ~1 ulp on the clamped range), so the mask costs a few operations per lane. */
static inline v8 exp8(v8 x) {
    x = max8(x, splat8(-87.3f));
    x = select8(x < splat8(88.7f), x, splat8(88.7f));
    v8 z = x * 1.44269504088896341f + 0.5f; /* n = floor(x / ln 2 + 1/2) */
    vi8 n = __builtin_convertvector(z, vi8);
    n -= (vi8)(__builtin_convertvector(n, v8) > z) & 1;
    v8 nf = __builtin_convertvector(n, v8);
    v8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v8 p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    return (v8)((vi8)p + ((n) << 23));
}

static inline v8 sigmoid8(v8 z) { return 1.0f / (1.0f + exp8(-z)); }

/* M at 8 positions of one channel. sum: sigmoid(c + s) = 1 / (1 + e^-c e^-s), from e^-c and e^-s computed once per
   channel and per position (`negative_exps`), so no exp per element, where |c| and |s| are at most FACTOR_LIMIT
   (the product stays a normal float); else, and for product, sigmoid(c o s). */
#define FACTOR_LIMIT 40.0f
static inline v8 bam_mask(float channel, float channel_exp, v8 spatial, v8 spatial_exp, long product, int factored) {
    if (product) return sigmoid8(channel * spatial);
    return factored ? 1.0f / (1.0f + channel_exp * spatial_exp) : sigmoid8(channel + spatial);
}

/* e^-v for T values (whole vectors: the arrays are TILE long); returns whether every |v| <= FACTOR_LIMIT. */
static int negative_exps(const float *v, float *out, long T) {
    int small = 1;
    for (long t = 0; t < T; t++) small &= fabsf(v[t]) <= FACTOR_LIMIT;
    for (long t = 0; t < T; t += LANES) store8(out + t, exp8(-load8(v + t)));
    return small;
}

/* h (N, K, P) = b + w x: BAM's first 1x1 conv, C -> K channels; and, if avg is not NULL, avg (N, C): the mean of x
   over positions, in the same pass. */
static void san_bam_reduce(const float *x, long cl, const float *w, const float *b, long N, long C, long P, long K,
                           float *h, float *avg) {
#pragma omp parallel
    {
        float *tile = new_tile(C), acc[TILE];
        double *sum = malloc(sizeof(double) * C);
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++) {
            for (long c = 0; c < C; c++) sum[c] = 0.0;
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                load_tile(x, cl, n, C, P, p0, T, tile);
                for (long k = 0; k < K; k++) {
                    for (long t = 0; t < T; t += LANES) {
                        v8 total = splat8(b ? b[k] : 0.0f);
                        for (long c = 0; c < C; c++) total += w[k * C + c] * load8(tile + c * TILE + t);
                        store8(acc + t, total);
                    }
                    memcpy(h + (n * K + k) * P + p0, acc, sizeof(float) * T);
                }
                for (long c = 0; c < C && avg; c++) sum[c] += row_sum(tile + c * TILE, T);
            }
            for (long c = 0; c < C && avg; c++) avg[n * C + c] = (float)(sum[c] / (double)P);
        }
        free(tile);
        free(sum);
    }
}

/* out = x + x M, in x's layout. */
static void san_bam_apply(const float *x, long cl, const float *channel, const float *spatial, long product, long N,
                          long C, long P, float *out) {
#pragma omp parallel
    {
        float *tile = new_tile(C), *cexp = malloc(sizeof(float) * C), s[TILE] = {0}, sexp[TILE];
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++) {
            for (long c = 0; c < C; c++) cexp[c] = expf(-channel[n * C + c]);
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                load_tile(x, cl, n, C, P, p0, T, tile);
                memcpy(s, spatial + n * P + p0, sizeof(float) * T);
                int small = negative_exps(s, sexp, T);
                for (long c = 0; c < C; c++)
                    for (long t = 0; t < T; t += LANES) {
                        v8 v = load8(tile + c * TILE + t);
                        int factored = small && fabsf(channel[n * C + c]) <= FACTOR_LIMIT;
                        v8 m = bam_mask(channel[n * C + c], cexp[c], load8(s + t), load8(sexp + t), product, factored);
                        store8(tile + c * TILE + t, v + v * m);
                    }
                store_tile(out, cl, n, C, P, p0, T, tile);
            }
        }
        free(tile);
        free(cexp);
    }
}

/* Backward through the mask, with l = sigmoid'(M) g x: grad_channel (N, C) = sum_p l (times s for product) and
   grad_spatial (N, P) = sum_c l (times c for product). (∂x's own part, g + g M, is written with the branch's in
   san_bam_reduce_backward, in one pass.) */
static void san_bam_backward_mask(const float *x, const float *g, long cl, const float *channel, const float *spatial,
                                  long product, long N, long C, long P, float *grad_channel, float *grad_spatial) {
#pragma omp parallel
    {
        float *tile = new_tile(C), *gtile = new_tile(C), *cexp = malloc(sizeof(float) * C), s[TILE] = {0};
        float sexp[TILE], gs[TILE];
        double *sum = malloc(sizeof(double) * C);
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++) {
            for (long c = 0; c < C; c++) sum[c] = 0.0, cexp[c] = expf(-channel[n * C + c]);
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                load_tile(x, cl, n, C, P, p0, T, tile);
                load_tile(g, cl, n, C, P, p0, T, gtile);
                memcpy(s, spatial + n * P + p0, sizeof(float) * T);
                int small = negative_exps(s, sexp, T);
                for (long t = 0; t < TILE; t++) gs[t] = 0.0f;
                for (long c = 0; c < C; c++) {
                    float logit = channel[n * C + c];
                    int factored = small && fabsf(logit) <= FACTOR_LIMIT;
                    for (long t = 0; t < T; t += LANES) {
                        v8 grad = load8(gtile + c * TILE + t), sp = load8(s + t);
                        v8 m = bam_mask(logit, cexp[c], sp, load8(sexp + t), product, factored);
                        v8 l = grad * load8(tile + c * TILE + t) * (1.0f - m) * m;
                        store8(tile + c * TILE + t, product ? l * sp : l); /* the logits' gradient, in the x tile */
                        store8(gs + t, load8(gs + t) + (product ? l * logit : l));
                    }
                    sum[c] += row_sum(tile + c * TILE, T);
                }
                memcpy(grad_spatial + n * P + p0, gs, sizeof(float) * T);
            }
            for (long c = 0; c < C; c++) grad_channel[n * C + c] = (float)sum[c];
        }
        free(tile);
        free(gtile);
        free(cexp);
        free(sum);
    }
}

/* ∂x of BAM, in x's layout: g + g M (through the mask; g in x's layout) + w^T grad_h (through the branch's first 1x1
   conv, grad_h (N, K, P)) + spread (N, C) at every position (through the channel means); and per sample that conv's
   weight and bias gradients, partial (N, K, C + 1), summed in order by the caller. */
static void san_bam_reduce_backward(const float *x, const float *g, long cl, const float *channel, const float *spatial,
                                    long product, const float *w, const float *grad_h, const float *spread, long N,
                                    long C, long P, long K, float *grad_x, float *partial) {
#pragma omp parallel
    {
        float *tile = new_tile(C), *gtile = new_tile(C), *hrow = calloc(TILE, sizeof(float));
        float *cexp = malloc(sizeof(float) * C), s[TILE] = {0}, sexp[TILE];
#pragma omp for schedule(static)
        for (long n = 0; n < N; n++) {
            float *sums = partial + n * K * (C + 1);
            for (long i = 0; i < K * (C + 1); i++) sums[i] = 0.0f;
            for (long c = 0; c < C; c++) cexp[c] = expf(-channel[n * C + c]);
            for (long p0 = 0; p0 < P; p0 += TILE) {
                long T = P - p0 < TILE ? P - p0 : TILE;
                load_tile(x, cl, n, C, P, p0, T, tile);
                load_tile(g, cl, n, C, P, p0, T, gtile);
                memcpy(s, spatial + n * P + p0, sizeof(float) * T);
                int small = negative_exps(s, sexp, T);
                for (long c = 0; c < C; c++) {
                    float logit = channel[n * C + c], add = spread ? spread[n * C + c] : 0.0f;
                    int factored = small && fabsf(logit) <= FACTOR_LIMIT;
                    for (long t = 0; t < T; t += LANES) {
                        v8 grad = load8(gtile + c * TILE + t);
                        v8 m = bam_mask(logit, cexp[c], load8(s + t), load8(sexp + t), product, factored);
                        store8(gtile + c * TILE + t, grad + grad * m + add);
                    }
                }
                for (long k = 0; k < K; k++) {
                    memcpy(hrow, grad_h + (n * K + k) * P + p0, sizeof(float) * T);
                    for (long c = 0; c < C; c++) {
                        float wkc = w[k * C + c];
                        for (long t = 0; t < T; t += LANES)
                            store8(gtile + c * TILE + t, load8(gtile + c * TILE + t) + wkc * load8(hrow + t));
                        sums[k * (C + 1) + c] += row_dot(hrow, tile + c * TILE, T);
                    }
                    sums[k * (C + 1) + C] += row_sum(hrow, T);
                }
                store_tile(grad_x, cl, n, C, P, p0, T, gtile);
            }
        }
        free(tile);
        free(gtile);
        free(hrow);
        free(cexp);
    }
}

/* ---- A few-channel chain's stages: conv -> batch norm -> activation, on (N, K, H, W) NCHW maps ------------

   activation: 0 identity, 1 ReLU, 2 sigmoid. One call per stage instead of one torch op per step of it (BAM's spatial branch has 4 stages of ~6 ops each, on
   maps of one to a few channels where the ops' fixed costs are all their cost). Batch norm as torch computes it in
   training (batch statistics, running statistics moved by `factor` with the unbiased variance) or from the given
   statistics (eval); its sums in double. */

/* sum over a row of (a - mu)^2, and of g (a - mu) */
static inline float row_squared_deviation(const float *a, float mu, long T) {
    v8 acc = {0};
    long t = 0;
    for (; t + LANES <= T; t += LANES) {
        v8 d = load8(a + t) - mu;
        acc += d * d;
    }
    float sum = 0.0f;
    for (long l = 0; l < LANES; l++) sum += acc[l];
    for (; t < T; t++) sum += (a[t] - mu) * (a[t] - mu);
    return sum;
}

static inline float row_dot_deviation(const float *g, const float *a, float mu, long T) {
    v8 acc = {0};
    long t = 0;
    for (; t + LANES <= T; t += LANES) acc += load8(g + t) * (load8(a + t) - mu);
    float sum = 0.0f;
    for (long l = 0; l < LANES; l++) sum += acc[l];
    for (; t < T; t++) sum += g[t] * (a[t] - mu);
    return sum;
}

/* Per channel k of y (N, K, P): sum over samples of f(row), each sample's row summed in float, the rows in double
   and in order (the same rounding whatever the thread count). */
#define SUM_ROWS(RESULT, N, K, P, EXPR)                                                                            \
    do {                                                                                                            \
        double *rows_ = malloc(sizeof(double) * (N) * (K));                                                         \
        _Pragma("omp parallel for schedule(static) if ((N) * (K) * (P) > 20000)") for (long n = 0; n < (N); n++)    \
            for (long k = 0; k < (K); k++) rows_[n * (K) + k] = (EXPR);                                              \
        for (long k = 0; k < (K); k++) {                                                                            \
            double total_ = 0.0;                                                                                    \
            for (long n = 0; n < (N); n++) total_ += rows_[n * (K) + k];                                             \
            RESULT[k] = total_;                                                                                     \
        }                                                                                                           \
        free(rows_);                                                                                                \
    } while (0)

static void stage_statistics(const float *y, long N, long K, long P, float eps, float *mean, float *invstd,
                             double *variance) {
    double *sums = malloc(sizeof(double) * K);
    SUM_ROWS(sums, N, K, P, row_sum(y + (n * K + k) * P, P));
    for (long k = 0; k < K; k++) mean[k] = (float)(sums[k] / (double)(N * P));
    SUM_ROWS(variance, N, K, P, row_squared_deviation(y + (n * K + k) * P, mean[k], P));
    for (long k = 0; k < K; k++) {
        variance[k] /= (double)(N * P);
        invstd[k] = (float)(1.0 / sqrt(variance[k] + (double)eps));
    }
    free(sums);
}

/* The statistics batch norm uses over y (N, K, P), into mean and invstd (K): the batch's (batch_stats; the running
   ones, if given, moved by `factor` with the unbiased variance), else the running ones if given, else mean and
   invstd are the caller's. */
static void batch_norm_statistics(const float *y, long N, long K, long P, long batch_stats, float eps, float factor,
                                  float *running_mean, float *running_var, float *mean, float *invstd) {
    if (!batch_stats) {
        for (long k = 0; k < K && running_mean; k++) {
            mean[k] = running_mean[k];
            invstd[k] = (float)(1.0 / sqrt((double)running_var[k] + (double)eps));
        }
        return;
    }
    double *variance = malloc(sizeof(double) * K);
    stage_statistics(y, N, K, P, eps, mean, invstd, variance);
    long count = N * P;
    for (long k = 0; k < K && running_mean; k++) {
        running_mean[k] = (1.0f - factor) * running_mean[k] + factor * mean[k];
        double unbiased = count > 1 ? variance[k] * (double)count / (double)(count - 1) : variance[k];
        running_var[k] = (1.0f - factor) * running_var[k] + factor * (float)unbiased;
    }
    free(variance);
}

/* out = act(gamma (y - mean) invstd + beta) over y (N, K, P); without has_bn, out = act(y). */
static void batch_norm_apply(const float *y, long N, long K, long P, long has_bn, const float *gamma,
                             const float *beta, const float *mean, const float *invstd, long activation, float *out) {
#pragma omp parallel for schedule(static) if (N * K * P > 20000)
    for (long n = 0; n < N; n++)
        for (long k = 0; k < K; k++) {
            const float *row = y + (n * K + k) * P;
            float *dst = out + (n * K + k) * P;
            float scale = 1.0f, shift = 0.0f;
            if (has_bn) {
                scale = invstd[k] * (gamma ? gamma[k] : 1.0f);
                shift = (beta ? beta[k] : 0.0f) - mean[k] * scale;
            }
            for (long p = 0; p < P; p++) {
                float v = row[p] * scale + shift;
                dst[p] = activation == 1 && v < 0.0f ? 0.0f : v;
            }
            if (activation == 2) {
                long p = 0;
                for (; p + LANES <= P; p += LANES) store8(dst + p, sigmoid8(load8(dst + p)));
                for (; p < P; p++) dst[p] = 1.0f / (1.0f + expf(-dst[p]));
            }
        }
}

/* Backward of batch norm over y (N, K, P), in place: g holds ∂ its output and becomes ∂y; grad_gamma and grad_beta
   (K) unless NULL. With batch statistics ∂y = gamma invstd (g - mean(g) - yhat mean(g yhat)), else gamma invstd g. */
static void batch_norm_backward(float *g, const float *y, long N, long K, long P, const float *gamma, long batch_stats,
                                const float *mean, const float *invstd, float *grad_gamma, float *grad_beta) {
    double *sums = malloc(sizeof(double) * K), *dots = malloc(sizeof(double) * K);
    SUM_ROWS(sums, N, K, P, row_sum(g + (n * K + k) * P, P));
    SUM_ROWS(dots, N, K, P, row_dot_deviation(g + (n * K + k) * P, y + (n * K + k) * P, mean[k], P));
    long count = N * P;
    for (long k = 0; k < K; k++) {
        if (grad_gamma) grad_gamma[k] = (float)(dots[k] * (double)invstd[k]);
        if (grad_beta) grad_beta[k] = (float)sums[k];
    }
#pragma omp parallel for schedule(static) if (N * K * P > 20000)
    for (long n = 0; n < N; n++)
        for (long k = 0; k < K; k++) {
            float g_mean = batch_stats ? (float)(sums[k] / (double)count) : 0.0f;
            float proj = batch_stats ? (float)(dots[k] / (double)count * (double)invstd[k] * (double)invstd[k]) : 0.0f;
            float unit = (gamma ? gamma[k] : 1.0f) * invstd[k], mu = mean[k];
            float *row_g = g + (n * K + k) * P;
            const float *row = y + (n * K + k) * P;
            for (long p = 0; p < P; p++) row_g[p] = (row_g[p] - g_mean - (row[p] - mu) * proj) * unit;
        }
    free(sums);
    free(dots);
}

/* conv_out = conv(x) + b (skipped when w is NULL: x is the conv output already, conv_out unused), then
   out = act(gamma (conv_out - mean) invstd + beta). mean and invstd (K): as batch_norm_statistics leaves them. */
void san_stage_forward(const float *x, long N, long Cin, long H, long W, long K, long KH, long KW, long ph, long pw,
                       long dh, long dw, const float *w, const float *b, float *scratch, float *conv_out,
                       long has_bn, const float *gamma, const float *beta, long batch_stats, float eps, float factor,
                       float *running_mean, float *running_var, float *mean, float *invstd, long activation,
                       float *out) {
    long Ho = H + 2 * ph - dh * (KH - 1), Wo = W + 2 * pw - dw * (KW - 1), P = Ho * Wo;
    const float *y = x;
    if (w) {
        san_conv2d_forward(x, Cin * H * W, H * W, W, 1, w, b, scratch, conv_out, N, Cin, H, W, K, KH, KW, ph, pw, dh,
                           dw);
        y = conv_out;
    }
    if (has_bn) batch_norm_statistics(y, N, K, P, batch_stats, eps, factor, running_mean, running_var, mean, invstd);
    batch_norm_apply(y, N, K, P, has_bn, gamma, beta, mean, invstd, activation, out);
}

/* Backward of san_stage_forward from grad_out (N, K, P): grad_conv (N, K, P) always; with w, grad_x (N, Cin, H, W),
   grad_w and grad_b (NULL when the conv has no bias); with batch norm, grad_gamma and grad_beta (NULL when not
   affine). scratch: as san_conv2d_forward's for both x and grad_conv; partial: as san_conv2d_weight_grad's. */
void san_stage_backward(const float *grad_out, const float *x, long N, long Cin, long H, long W, long K, long KH,
                        long KW, long ph, long pw, long dh, long dw, const float *w, const float *conv_out,
                        const float *out, long has_bn, const float *gamma, long batch_stats, const float *mean,
                        const float *invstd, long activation, float *grad_conv, float *grad_x, float *grad_w, float *grad_b,
                        float *grad_gamma, float *grad_beta, float *scratch, float *partial, long parts) {
    long Ho = H + 2 * ph - dh * (KH - 1), Wo = W + 2 * pw - dw * (KW - 1), P = Ho * Wo;
    const float *y = w ? conv_out : x;
#pragma omp parallel for schedule(static) if (N * K * P > 20000)
    for (long i = 0; i < N * K; i++) {
        const float *o = out + i * P, *go = grad_out + i * P;
        float *gc = grad_conv + i * P;
        if (activation == 1)
            for (long p = 0; p < P; p++) gc[p] = o[p] <= 0.0f ? 0.0f : go[p];
        else if (activation == 2)
            for (long p = 0; p < P; p++) gc[p] = go[p] * (1.0f - o[p]) * o[p];
        else
            memcpy(gc, go, sizeof(float) * P);
    }
    if (has_bn) batch_norm_backward(grad_conv, y, N, K, P, gamma, batch_stats, mean, invstd, grad_gamma, grad_beta);
    if (!w) return;
    if (grad_b && has_bn && batch_stats) {
        /* a bias before a batch norm over batch statistics is subtracted again with the mean: its gradient is 0 */
        for (long k = 0; k < K; k++) grad_b[k] = 0.0f;
    } else if (grad_b) {
        double *sums = malloc(sizeof(double) * K);
        SUM_ROWS(sums, N, K, P, row_sum(grad_conv + (n * K + k) * P, P));
        for (long k = 0; k < K; k++) grad_b[k] = (float)sums[k];
        free(sums);
    }
    san_conv2d_weight_grad(grad_conv, x, Cin * H * W, H * W, W, 1, scratch, partial, grad_w, N, Cin, H, W, K, KH, KW,
                           ph, pw, dh, dw, parts);
    /* grad_x: the forward conv of grad_conv with the kernel flipped and its channels swapped */
    float *flipped = malloc(sizeof(float) * K * Cin * KH * KW);
    for (long k = 0; k < K; k++)
        for (long c = 0; c < Cin; c++)
            for (long i = 0; i < KH; i++)
                for (long j = 0; j < KW; j++)
                    flipped[((c * K + k) * KH + (KH - 1 - i)) * KW + (KW - 1 - j)] = w[((k * Cin + c) * KH + i) * KW + j];
    san_conv2d_forward(grad_conv, K * P, P, Wo, 1, flipped, NULL, scratch, grad_x, N, K, Ho, Wo, Cin, KH, KW,
                       dh * (KH - 1) - ph, dw * (KW - 1) - pw, dh, dw);
    free(flipped);
}

/* ---- BAM's channel MLP: Linear (C -> K) -> BatchNorm1d -> ReLU -> Linear (K -> C), on (N, C) channel means --------

   Tiny (N x C), so plain loops; one call each way instead of a dozen torch ops. The batch norm is a stage's over
   (N, K, 1). */

/* out (N, O) = a (N, I) w^T + b (NULL: none). */
static void linear_forward(const float *a, const float *w, const float *b, long N, long I, long O, float *out) {
    for (long n = 0; n < N; n++)
        for (long o = 0; o < O; o++) {
            float v = b ? b[o] : 0.0f;
            for (long i = 0; i < I; i++) v += w[o * I + i] * a[n * I + i];
            out[n * O + o] = v;
        }
}

/* Backward of linear_forward from g (N, O): gw (O, I) and gb (O, unless NULL), summed over n in double; grad_a (N, I)
   unless NULL. */
static void linear_backward(const float *g, const float *a, const float *w, long N, long I, long O, float *gw,
                            float *gb, float *grad_a) {
    for (long o = 0; o < O; o++) {
        double bias = 0.0;
        for (long n = 0; n < N; n++) bias += g[n * O + o];
        if (gb) gb[o] = (float)bias;
        for (long i = 0; i < I; i++) {
            double sum = 0.0;
            for (long n = 0; n < N; n++) sum += g[n * O + o] * a[n * I + i];
            gw[o * I + i] = (float)sum;
        }
    }
    for (long n = 0; n < N && grad_a; n++)
        for (long i = 0; i < I; i++) {
            float v = 0.0f;
            for (long o = 0; o < O; o++) v += g[n * O + o] * w[o * I + i];
            grad_a[n * I + i] = v;
        }
}

static void san_mlp_forward(const float *mean, long N, long C, long K, const float *w1, const float *b1,
                            const float *gamma, const float *beta, long batch_stats, float eps, float factor,
                            float *running_mean, float *running_var, const float *w2, const float *b2, float *hidden,
                            float *bn_mean, float *bn_invstd, float *active, float *channel) {
    linear_forward(mean, w1, b1, N, C, K, hidden);
    batch_norm_statistics(hidden, N, K, 1, batch_stats, eps, factor, running_mean, running_var, bn_mean, bn_invstd);
    batch_norm_apply(hidden, N, K, 1, 1, gamma, beta, bn_mean, bn_invstd, 1, active);
    linear_forward(active, w2, b2, N, K, C, channel);
}

/* Backward of san_mlp_forward from grad_channel (N, C): grad_mean (N, C) and the gradients of w1, b1, gamma, beta, w2,
   b2 (a NULL one is skipped); work: N * K floats. */
static void san_mlp_backward(const float *grad_channel, const float *mean, long N, long C, long K, const float *w1,
                             const float *gamma, long batch_stats, const float *w2, const float *hidden,
                             const float *bn_mean, const float *bn_invstd, const float *active, float *grad_mean,
                             float *gw1, float *gb1, float *ggamma, float *gbeta, float *gw2, float *gb2, float *work) {
    linear_backward(grad_channel, active, w2, N, K, C, gw2, gb2, work);
    for (long i = 0; i < N * K; i++) work[i] = active[i] > 0.0f ? work[i] : 0.0f;
    batch_norm_backward(work, hidden, N, K, 1, gamma, batch_stats, bn_mean, bn_invstd, ggamma, gbeta);
    linear_backward(work, mean, w1, N, C, K, gw1, gb1, grad_mean);
}

/* ---- A whole chain of stages in one call: stage i's input is stage i-1's output (stage 0's: x0) -------------------

   geometry: S rows of CHAIN_LONGS longs (Cin, H, W, K, KH, KW, ph, pw, dh, dw, has_conv, has_bn, batch_stats,
   activation); scalars: S rows of (eps, factor); tensors: S rows of CHAIN_POINTERS pointers (w, b, gamma, beta,
   running_mean, running_var, mean, invstd, conv_out, out, scratch, grad_conv, grad_x, grad_w, grad_b, grad_gamma,
   grad_beta, partial), as san_stage_forward and san_stage_backward take them. */
#define CHAIN_LONGS 14
#define CHAIN_POINTERS 18
enum { T_W, T_B, T_GAMMA, T_BETA, T_RMEAN, T_RVAR, T_MEAN, T_INVSTD, T_CONV, T_OUT, T_SCRATCH, T_GCONV, T_GX, T_GW, T_GB,
       T_GGAMMA, T_GBETA, T_PARTIAL };

static void san_chain_forward(long S, long N, const long *geometry, const float *scalars, float **tensors,
                              const float *x0) {
    for (long i = 0; i < S; i++) {
        const long *g = geometry + i * CHAIN_LONGS;
        float **t = tensors + i * CHAIN_POINTERS;
        const float *x = i == 0 ? x0 : tensors[(i - 1) * CHAIN_POINTERS + T_OUT];
        san_stage_forward(x, N, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10] ? t[T_W] : NULL,
                          t[T_B], t[T_SCRATCH], t[T_CONV], g[11], t[T_GAMMA], t[T_BETA], g[12], scalars[2 * i],
                          scalars[2 * i + 1], t[T_RMEAN], t[T_RVAR], t[T_MEAN], t[T_INVSTD], g[13], t[T_OUT]);
    }
}

/* Backward from grad_out, the last stage's output gradient: each stage's parameter gradients, and stage 0's
   grad_conv (or, if stage 0 convolves, its grad_x). */
static void san_chain_backward(long S, long N, const long *geometry, float **tensors, const float *x0,
                               const float *grad_out, long parts) {
    for (long i = S - 1; i >= 0; i--) {
        const long *g = geometry + i * CHAIN_LONGS;
        float **t = tensors + i * CHAIN_POINTERS;
        const float *x = i == 0 ? x0 : tensors[(i - 1) * CHAIN_POINTERS + T_OUT];
        const float *grad = i == S - 1 ? grad_out : tensors[(i + 1) * CHAIN_POINTERS + T_GX];
        san_stage_backward(grad, g[10] ? x : t[T_CONV], N, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9],
                           g[10] ? t[T_W] : NULL, t[T_CONV], t[T_OUT], g[11], t[T_GAMMA], g[12], t[T_MEAN],
                           t[T_INVSTD], g[13], t[T_GCONV], t[T_GX], t[T_GW], t[T_GB], t[T_GGAMMA], t[T_GBETA],
                           t[T_SCRATCH], t[T_PARTIAL], parts);
        if (!g[10]) t[T_GX] = t[T_GCONV]; /* a stage without a conv passes on its conv output's gradient */
    }
}

/* ---- BAM as one call each way (san/kernels/bam_op.py) -------------------------------------------------------------

   The first 1x1 conv (C -> K) and the channel means in one pass over x, the channel MLP, the spatial branch's
   stages as a chain from that conv's output (stage 0: its batch norm and activation only), and the mask; backward
   recomputes the MLP and the branch from what forward kept (the conv's output, the means) and writes all of ∂x in
   one pass. The branch's and the MLP's intermediates live in buffers of this call only.

   sizes: N, C, H, W, K, hidden, mlp batch_stats, product, S, parts, then S rows of CHAIN_LONGS; scalars: the MLP's
   (eps, factor), then S rows of (eps, factor); params (and grads, alike): reduce w (K, C), reduce b, then the MLP's
   w1, b1, gamma, beta, running_mean, running_var, w2, b2, then per stage w, b, gamma, beta, running_mean,
   running_var (the grads' running entries are unused, stage 0's w and b too: the reduce's come first). */
#define BAM_SIZES 10
#define BAM_MLP 2
#define BAM_STAGE0 10
#define BAM_STAGE_PARAMS 6

/* The intermediates of one call come from a block kept per calling thread and grown to the largest call seen: fresh
   memory for them each call cost more in page faults than the arithmetic (BAM's backward at LeNet-5's first map:
   1.4 ms with fresh memory, 0.7 ms without). A call that outgrows the block takes malloc's memory for the rest and
   leaves the next call a block large enough. The block is freed when its thread exits (a thread-specific key's
   destructor), so threads that come and go — a worker's training thread per run — leave nothing behind; ctypes never
   unloads the library, so the destructor stays there for every thread's exit. */
typedef struct {
    char *base;
    size_t size, used, wanted;
} arena_t;
static __thread arena_t arena;
static pthread_key_t arena_key;
static pthread_once_t arena_key_once = PTHREAD_ONCE_INIT;
static int arena_key_made; /* pthread_key_create succeeded: without a key no block is kept (plain malloc per call) */
static long arena_blocks;  /* blocks held by live threads, for san_arena_blocks */

static void arena_release(void *block) {
    /* a library call from this thread's later exit code must not see the freed block */
    if (block == arena.base) arena = (arena_t){0};
    free(block);
    __atomic_sub_fetch(&arena_blocks, 1, __ATOMIC_RELAXED);
}

static void arena_key_create(void) { arena_key_made = pthread_key_create(&arena_key, arena_release) == 0; }

static void arena_begin(void) { arena.used = arena.wanted = 0; }

static void arena_end(void) {
    if (arena.wanted <= arena.size) return;
    size_t wanted = arena.wanted;
    pthread_once(&arena_key_once, arena_key_create);
    if (arena.base) { /* a block exists only under a key */
        pthread_setspecific(arena_key, NULL);
        free(arena.base);
        __atomic_sub_fetch(&arena_blocks, 1, __ATOMIC_RELAXED);
    }
    arena = (arena_t){0};
    char *block = arena_key_made ? malloc(wanted) : NULL;
    if (block && pthread_setspecific(arena_key, block) != 0) {
        free(block);
        block = NULL;
    }
    if (!block) return; /* the next calls take malloc's memory, as a call that outgrows its block does */
    __atomic_add_fetch(&arena_blocks, 1, __ATOMIC_RELAXED);
    arena.base = block;
    arena.size = wanted;
}

/* How many threads hold a block (tests/test_attention_native.py). */
void san_arena_blocks(long *count) { *count = __atomic_load_n(&arena_blocks, __ATOMIC_RELAXED); }

typedef struct {
    void **owned; /* what came from malloc (the block was full), freed by scratch_free */
    long n_owned;
} scratch_t;

static float *scratch_floats(scratch_t *s, long count) {
    size_t bytes = ((size_t)(count > 0 ? count : 1) * sizeof(float) + 63) & ~(size_t)63;
    arena.wanted += bytes;
    if (arena.base && arena.used + bytes <= arena.size) {
        float *p = (float *)(arena.base + arena.used);
        arena.used += bytes;
        return p;
    }
    float *p = malloc(bytes);
    s->owned = realloc(s->owned, sizeof(void *) * (size_t)(s->n_owned + 1));
    s->owned[s->n_owned++] = p;
    return p;
}

static void scratch_free(scratch_t *s) {
    for (long i = 0; i < s->n_owned; i++) free(s->owned[i]);
    free(s->owned);
    s->owned = NULL;
    s->n_owned = 0;
}

typedef struct {
    float **t; /* S rows of CHAIN_POINTERS, as san_chain_forward takes them */
} chain_buffers;

/* Buffers for a chain from x0 (N, geometry[0] channels, H, W): per stage its parameters (from params, running
   statistics only where `update` moves them or batch statistics are off) and its maps; with grads, its gradients. */
static chain_buffers chain_new(scratch_t *sc, long S, long N, const long *geometry, float **params, float **grads,
                               const float *x0, long update, long parts) {
    chain_buffers b = {calloc((size_t)S * CHAIN_POINTERS, sizeof(float *))};
    for (long i = 0; i < S; i++) {
        const long *g = geometry + i * CHAIN_LONGS;
        float **t = b.t + i * CHAIN_POINTERS, **p = params + i * BAM_STAGE_PARAMS;
        long Cin = g[0], H = g[1], W = g[2], K = g[3], KH = g[4], KW = g[5], ph = g[6], pw = g[7], dh = g[8],
             dw = g[9], has_conv = g[10], batch_stats = g[12];
        long Ho = H + 2 * ph - dh * (KH - 1), Wo = W + 2 * pw - dw * (KW - 1);
        t[T_W] = has_conv ? p[0] : NULL;
        t[T_B] = has_conv ? p[1] : NULL;
        t[T_GAMMA] = p[2];
        t[T_BETA] = p[3];
        int running = update || !batch_stats;
        t[T_RMEAN] = running ? p[4] : NULL;
        t[T_RVAR] = running ? p[5] : NULL;
        t[T_MEAN] = scratch_floats(sc, K);
        t[T_INVSTD] = scratch_floats(sc, K);
        t[T_CONV] = has_conv ? scratch_floats(sc, N * K * Ho * Wo)
                             : (float *)(i == 0 ? x0 : b.t[(i - 1) * CHAIN_POINTERS + T_OUT]);
        t[T_OUT] = scratch_floats(sc, N * K * Ho * Wo);
        if (has_conv) {
            long tph = dh * (KH - 1) - ph, tpw = dw * (KW - 1) - pw;
            long forward = N * Cin * (H + 2 * ph) * (W + 2 * pw), backward = N * K * (Ho + 2 * tph) * (Wo + 2 * tpw);
            t[T_SCRATCH] = scratch_floats(sc, forward > backward ? forward : backward);
        }
        if (grads) {
            float **q = grads + i * BAM_STAGE_PARAMS;
            t[T_GCONV] = scratch_floats(sc, N * K * Ho * Wo);
            t[T_GX] = has_conv ? scratch_floats(sc, N * Cin * H * W) : NULL;
            t[T_GW] = has_conv ? q[0] : NULL;
            t[T_GB] = has_conv ? q[1] : NULL;
            t[T_GGAMMA] = g[11] ? q[2] : NULL;
            t[T_GBETA] = g[11] ? q[3] : NULL;
            t[T_PARTIAL] = has_conv ? scratch_floats(sc, parts * K * Cin * KH * KW) : NULL;
        }
    }
    return b;
}

static void chain_free(chain_buffers *b) { free(b->t); }

typedef struct {
    float *hidden, *mean, *invstd, *active, *channel;
} mlp_buffers;

/* The channel logits (N, C) from the channel means; running statistics move only if `update`. */
static mlp_buffers bam_mlp(scratch_t *sc, const long *sizes, const float *scalars, float **params, const float *mean,
                           long update) {
    long N = sizes[0], C = sizes[1], hidden = sizes[5], batch_stats = sizes[6];
    float **m = params + BAM_MLP;
    mlp_buffers b = {scratch_floats(sc, N * hidden), scratch_floats(sc, hidden), scratch_floats(sc, hidden),
                     scratch_floats(sc, N * hidden), scratch_floats(sc, N * C)};
    int running = update || !batch_stats;
    san_mlp_forward(mean, N, C, hidden, m[0], m[1], m[2], m[3], batch_stats, scalars[0], scalars[1],
                    running ? m[4] : NULL, running ? m[5] : NULL, m[6], m[7], b.hidden, b.mean, b.invstd, b.active,
                    b.channel);
    return b;
}

/* out = x + x M; reduced (N, K, P) and mean (N, C): what backward needs. */
void san_bam_forward(const float *x, long cl, const long *sizes, const float *scalars, float **params, long update,
                     float *reduced, float *mean, float *out) {
    long N = sizes[0], C = sizes[1], P = sizes[2] * sizes[3], K = sizes[4], product = sizes[7], S = sizes[8];
    scratch_t sc = {NULL, 0};
    arena_begin();
    san_bam_reduce(x, cl, params[0], params[1], N, C, P, K, reduced, mean);
    mlp_buffers mlp = bam_mlp(&sc, sizes, scalars, params, mean, update);
    chain_buffers chain = chain_new(&sc, S, N, sizes + BAM_SIZES, params + BAM_STAGE0, NULL, reduced, update,
                                    sizes[9]);
    san_chain_forward(S, N, sizes + BAM_SIZES, scalars + 2, chain.t, reduced);
    san_bam_apply(x, cl, mlp.channel, chain.t[(S - 1) * CHAIN_POINTERS + T_OUT], product, N, C, P, out);
    chain_free(&chain);
    scratch_free(&sc);
    arena_end();
}

/* ∂x (in x's layout) and every parameter's gradient into grads, from g (in x's layout). */
void san_bam_backward(const float *x, const float *g, long cl, const long *sizes, const float *scalars,
                      float **params, const float *reduced, const float *mean, float *grad_x, float **grads) {
    long N = sizes[0], C = sizes[1], P = sizes[2] * sizes[3], K = sizes[4], hidden = sizes[5], product = sizes[7];
    long S = sizes[8], parts = sizes[9];
    scratch_t sc = {NULL, 0};
    arena_begin();
    mlp_buffers mlp = bam_mlp(&sc, sizes, scalars, params, mean, 0);
    chain_buffers chain = chain_new(&sc, S, N, sizes + BAM_SIZES, params + BAM_STAGE0, grads + BAM_STAGE0, reduced, 0,
                                    parts);
    san_chain_forward(S, N, sizes + BAM_SIZES, scalars + 2, chain.t, reduced);
    const float *spatial = chain.t[(S - 1) * CHAIN_POINTERS + T_OUT];
    float *grad_channel = scratch_floats(&sc, N * C), *grad_spatial = scratch_floats(&sc, N * P);
    san_bam_backward_mask(x, g, cl, mlp.channel, spatial, product, N, C, P, grad_channel, grad_spatial);
    san_chain_backward(S, N, sizes + BAM_SIZES, chain.t, reduced, grad_spatial, parts);
    float *grad_mean = scratch_floats(&sc, N * C), *work = scratch_floats(&sc, N * hidden);
    float **m = params + BAM_MLP, **gm = grads + BAM_MLP;
    san_mlp_backward(grad_channel, mean, N, C, hidden, m[0], m[2], sizes[6], m[6], mlp.hidden, mlp.mean, mlp.invstd,
                     mlp.active, grad_mean, gm[0], gm[1], gm[2], gm[3], gm[6], gm[7], work);
    for (long i = 0; i < N * C; i++) grad_mean[i] /= (float)P; /* each position's share of the mean */
    float *partial = scratch_floats(&sc, N * K * (C + 1));
    san_bam_reduce_backward(x, g, cl, mlp.channel, spatial, product, params[0], chain.t[T_GCONV], grad_mean, N, C, P,
                            K, grad_x, partial);
    for (long i = 0; i < K * (C + 1); i++) { /* per sample, summed in order */
        float total = 0.0f;
        for (long n = 0; n < N; n++) total += partial[n * K * (C + 1) + i];
        long k = i / (C + 1), c = i % (C + 1);
        if (c < C) grads[0][k * C + c] = total;
        else if (grads[1]) grads[1][k] = total;
    }
    chain_free(&chain);
    scratch_free(&sc);
    arena_end();
}

/* ---- SAN's full-size passes (san/kernels/san_op.py) ---------------------------------------------------------------

   A map y (N, C, H, W) in NCHW (cl = 0) or channels-last (cl = 1) is walked as planes of H rows: NCHW has N C planes
   whose rows are W long with horizontal neighbours 1 apart; channels-last has N planes whose rows are W C long with
   horizontal neighbours C apart. The reference r is (N, 1, H, W) (rc = 1, CCA: one value per position) or y's shape
   and layout (rc = C). d = |y - r| (or y - r without use_abs); the extrema count of eq 10 is 1 + how many of the 3x3
   neighbours inside the map d is >= (a neighbour outside never counts), as `extrema_count` (functional.py). */

#define SAN_ROWS 8 /* rows per task: a task recomputes d on the two rows around its own */

typedef struct {
    long planes, H, L, step, C, W, cl, rc;
} san_geometry;

static san_geometry san_geometry_of(long cl, long N, long C, long H, long W, long rc) {
    san_geometry g = {cl ? N : N * C, H, cl ? W * C : W, cl ? C : 1, C, W, cl, rc};
    return g;
}

static inline const float *san_ref_row(const float *r, san_geometry g, long plane, long h) {
    if (g.rc != 1) return r + (plane * g.H + h) * g.L;
    long n = g.cl ? plane : plane / g.C;
    return r + (n * g.H + h) * g.W;
}

/* d of row h of a plane, L values. */
static void san_doc_row(const float *y, const float *r, san_geometry g, long plane, long h, long use_abs, float *d) {
    const float *yr = y + (plane * g.H + h) * g.L, *rr = san_ref_row(r, g, plane, h);
    if (g.cl && g.rc == 1) {
        for (long w = 0; w < g.W; w++) {
            float ref = rr[w];
            for (long c = 0; c < g.C; c++) d[w * g.C + c] = yr[w * g.C + c] - ref;
        }
    } else {
        for (long i = 0; i < g.L; i++) d[i] = yr[i] - rr[i];
    }
    if (use_abs)
        for (long i = 0; i < g.L; i++) d[i] = fabsf(d[i]);
}

/* count[i] = 1 + #{neighbours of cur[i] in the rows prev, cur, next (NULL: outside the map) that cur[i] is >=}. */
static void san_extrema_row(const float *prev, const float *cur, const float *next, long L, long step, float *count) {
    for (long i = 0; i < L; i++) count[i] = 1.0f;
    const float *rows[3] = {prev, cur, next};
    for (int k = 0; k < 3; k++) {
        const float *row = rows[k];
        if (!row) continue;
        if (row != cur)
            for (long i = 0; i < L; i++) count[i] += cur[i] >= row[i] ? 1.0f : 0.0f;
        for (long i = step; i < L; i++) count[i] += cur[i] >= row[i - step] ? 1.0f : 0.0f;
        for (long i = 0; i + step < L; i++) count[i] += cur[i] >= row[i + step] ? 1.0f : 0.0f;
    }
}

/* weighted = d count / 9 (or d without use_extrema), and count (uint8, if not NULL), both in y's layout. */
void san_san_weighted(const float *y, const float *r, long cl, long N, long C, long H, long W, long rc, long use_abs,
                      long use_extrema, float *weighted, unsigned char *count) {
    san_geometry g = san_geometry_of(cl, N, C, H, W, rc);
    long blocks = (H + SAN_ROWS - 1) / SAN_ROWS;
#pragma omp parallel
    {
        float *d[3], *cnt = malloc(sizeof(float) * g.L);
        for (int k = 0; k < 3; k++) d[k] = malloc(sizeof(float) * g.L);
#pragma omp for schedule(static)
        for (long task = 0; task < g.planes * blocks; task++) {
            long plane = task / blocks, h0 = task % blocks * SAN_ROWS;
            long h1 = h0 + SAN_ROWS < H ? h0 + SAN_ROWS : H;
            /* d[(h + 1) % 3] holds row h: rows h0 - 1 .. h0 first */
            if (h0 > 0) san_doc_row(y, r, g, plane, h0 - 1, use_abs, d[h0 % 3]);
            san_doc_row(y, r, g, plane, h0, use_abs, d[(h0 + 1) % 3]);
            for (long h = h0; h < h1; h++) {
                if (h + 1 < H) san_doc_row(y, r, g, plane, h + 1, use_abs, d[(h + 2) % 3]);
                float *cur = d[(h + 1) % 3];
                float *out = weighted + (plane * H + h) * g.L;
                if (!use_extrema) {
                    memcpy(out, cur, sizeof(float) * g.L);
                    continue;
                }
                san_extrema_row(h > 0 ? d[h % 3] : NULL, cur, h + 1 < H ? d[(h + 2) % 3] : NULL, g.L, g.step, cnt);
                for (long i = 0; i < g.L; i++) out[i] = cur[i] * cnt[i] * (1.0f / 9.0f);
                if (count) {
                    unsigned char *c8 = count + (plane * H + h) * g.L;
                    for (long i = 0; i < g.L; i++) c8[i] = (unsigned char)cnt[i];
                }
            }
        }
        for (int k = 0; k < 3; k++) free(d[k]);
        free(cnt);
    }
}

/* Elementwise over `total` values, in blocks of 8 (a scalar tail). */
#define SAN_BLOCK 4096

/* out = y sigmoid(z). */
void san_san_apply(const float *y, const float *z, long total, float *out) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < total; b += SAN_BLOCK) {
        long e = b + SAN_BLOCK < total ? b + SAN_BLOCK : total, i = b;
        for (; i + LANES <= e; i += LANES) store8(out + i, sigmoid8(load8(z + i)) * load8(y + i));
        for (; i < e; i++) out[i] = y[i] / (1.0f + expf(-z[i]));
    }
}

/* grad_z = g y m (1 - m) with m = sigmoid(z): the gradient reaching the smoothing's output. */
void san_san_logits_grad(const float *g, const float *y, const float *z, long total, float *grad_z) {
#pragma omp parallel for schedule(static)
    for (long b = 0; b < total; b += SAN_BLOCK) {
        long e = b + SAN_BLOCK < total ? b + SAN_BLOCK : total, i = b;
        for (; i + LANES <= e; i += LANES) {
            v8 m = sigmoid8(load8(z + i));
            store8(grad_z + i, load8(g + i) * load8(y + i) * m * (1.0f - m));
        }
        for (; i < e; i++) {
            float m = 1.0f / (1.0f + expf(-z[i]));
            grad_z[i] = g[i] * y[i] * m * (1.0f - m);
        }
    }
}

/* ∂y = g m + e and ∂r = -e summed over channels (rc = 1) or -e (rc = C), with m = sigmoid(z) and e the gradient
   reaching d through the weighting — grad_w count / 9 (or grad_w) — times sign(y - r) with use_abs. grad_r may be
   NULL. Tasks own whole rows of every channel of a sample, so each ∂r value is one thread's sum in channel order. */
void san_san_input_grad(const float *g, const float *y, const float *r, const float *z, const float *grad_w,
                        const unsigned char *count, long cl, long N, long C, long H, long W, long rc, long use_abs,
                        long use_extrema, float *grad_y, float *grad_r) {
    san_geometry geo = san_geometry_of(cl, N, C, H, W, rc);
    long P = H * W;
#pragma omp parallel
    {
        float *e = malloc(sizeof(float) * (cl ? W * C : W)), *d = malloc(sizeof(float) * (cl ? W * C : W));
        float *acc = malloc(sizeof(float) * W);
#pragma omp for schedule(static)
        for (long task = 0; task < N * H; task++) {
            long n = task / H, h = task % H;
            for (long w = 0; w < W; w++) acc[w] = 0.0f;
            for (long c = 0; c < (cl ? 1 : C); c++) {
                long plane = cl ? n : n * C + c, base = (plane * H + h) * geo.L;
                const float *gr = g + base, *zr = z + base, *gw = grad_w + base;
                san_doc_row(y, r, geo, plane, h, 0, d); /* y - r, for the sign */
                for (long i = 0; i < geo.L; i++) {
                    float v = gw[i];
                    if (use_extrema) v = v * (1.0f / 9.0f) * (float)count[base + i];
                    if (use_abs) v = d[i] > 0.0f ? v : (d[i] < 0.0f ? -v : 0.0f * v);
                    e[i] = v;
                }
                long i = 0;
                for (; i + LANES <= geo.L; i += LANES)
                    store8(grad_y + base + i, load8(gr + i) * sigmoid8(load8(zr + i)) + load8(e + i));
                for (; i < geo.L; i++) grad_y[base + i] = gr[i] / (1.0f + expf(-zr[i])) + e[i];
                if (!grad_r) continue;
                if (rc != 1) {
                    for (long k = 0; k < geo.L; k++) grad_r[base + k] = -e[k];
                } else if (cl) {
                    for (long w = 0; w < W; w++)
                        for (long k = 0; k < C; k++) acc[w] -= e[w * C + k];
                } else {
                    for (long w = 0; w < W; w++) acc[w] -= e[w];
                }
            }
            if (grad_r && rc == 1) memcpy(grad_r + n * P + h * W, acc, sizeof(float) * W);
        }
        free(e);
        free(d);
        free(acc);
    }
}
