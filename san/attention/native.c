/* Direct stride-1 convolutions over few-channel maps, for the attention branches on CPU (san/attention/native.py).

   oneDNN pads a conv's input and output channels into blocks of 16, so CBAM's 2->1 7x7 conv and BAM's 1->1 dilated
   3x3 convs cost what 16- or 256-times larger convs would. These loops do only the real taps: each block of 8
   output columns (4 rows at a time) accumulates in registers over every tap of a zero-padded copy of the input,
   which the kernels make themselves from the input's own strides (any layout).

   Results are deterministic for a given input: the batch is split into a fixed number of parts however many
   threads run, and the weight gradient's per-part sums are added in order. */
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
#define LANES 8
#define ROWS 4

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
            if (s.w == 1)
                memcpy(row + pw, src, sizeof(float) * W);
            else
                for (long w = 0; w < W; w++) row[pw + w] = src[w * s.w];
        }
    }
}

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
    for (long oh0 = 0; oh0 < Ho; oh0 += ROWS) {
        long rows = Ho - oh0 < ROWS ? Ho - oh0 : ROWS;
        for (long ow0 = 0; ow0 < Wo; ow0 += LANES) {
            long ow = ow0 + LANES <= Wo ? ow0 : Wo - LANES; /* the last block overlaps the one before it */
            v8 acc[ROWS];
            for (long r = 0; r < ROWS; r++) acc[r] = (v8){0} + b;
            for (long ci = 0; ci < Cin; ci++)
                for (long kh = 0; kh < KH; kh++)
                    for (long kw = 0; kw < KW; kw++) {
                        float tap = wc[(ci * KH + kh) * KW + kw];
                        const float *src = xp + (ci * Hp + oh0 + kh * dh) * Wp + ow + kw * dw;
                        if (rows == ROWS)
                            for (long r = 0; r < ROWS; r++) acc[r] += tap * load8(src + r * Wp);
                        else
                            for (long r = 0; r < rows; r++) acc[r] += tap * load8(src + r * Wp);
                    }
            for (long r = 0; r < rows; r++) store8(y + (oh0 + r) * Wo + ow, acc[r]);
        }
    }
}

/* y (N, Cout, Ho, Wo) contiguous = conv(x, w) + bias, stride 1, zero padding (ph, pw), dilation (dh, dw).
   scratch: N * Cin * (H + 2ph) * (W + 2pw) floats. bias may be NULL. */
void san_conv2d_forward(const float *x, long sn, long sc, long sh, long sw, const float *w, const float *bias,
                        float *scratch, float *y, long N, long Cin, long H, long W, long Cout, long KH, long KW,
                        long ph, long pw, long dh, long dw) {
    strides4 s = {sn, sc, sh, sw};
    long Hp = H + 2 * ph, Wp = W + 2 * pw, Ho = Hp - dh * (KH - 1), Wo = Wp - dw * (KW - 1);
#pragma omp parallel for schedule(static) if (N * Cout * Ho * Wo * Cin * KH * KW > 200000)
    for (long n = 0; n < N; n++) {
        float *xp = scratch + n * Cin * Hp * Wp;
        pad_sample(x, s, xp, n, Cin, H, W, ph, pw);
        for (long co = 0; co < Cout; co++)
            forward_channel(xp, w + co * Cin * KH * KW, bias ? bias[co] : 0.0f, y + (n * Cout + co) * Ho * Wo, Cin,
                            Hp, Wp, KH, KW, Ho, Wo, dh, dw);
    }
}

/* gw (Cout, Cin, KH, KW) = sum over n, oh, ow of g[n, co, oh, ow] * xpad[n, ci, oh + kh dh, ow + kw dw]: the weight
   gradient of san_conv2d_forward. g: (N, Cout, Ho, Wo) contiguous. scratch as there; partial: parts * Cout * Cin *
   KH * KW floats. */
void san_conv2d_weight_grad(const float *g, const float *x, long sn, long sc, long sh, long sw, float *scratch,
                            float *partial, float *gw, long N, long Cin, long H, long W, long Cout, long KH, long KW,
                            long ph, long pw, long dh, long dw, long parts) {
    strides4 s = {sn, sc, sh, sw};
    long Hp = H + 2 * ph, Wp = W + 2 * pw, Ho = Hp - dh * (KH - 1), Wo = Wp - dw * (KW - 1);
    long taps = KH * KW, total = Cout * Cin * taps, tail = Wo % LANES;
    v8 mask = {0}; /* the overlapping last block of a row counts only its last `tail` lanes */
    for (long l = 0; l < LANES; l++) mask[l] = (tail == 0 || l >= LANES - tail) ? 1.0f : 0.0f;
#pragma omp parallel for schedule(static) if (N * Cout * Ho * Wo * Cin * KH * KW > 200000)
    for (long part = 0; part < parts; part++) {
        long first = N * part / parts, last = N * (part + 1) / parts;
        float *sums = partial + part * total;
        for (long t = 0; t < total; t++) sums[t] = 0.0f;
        for (long n = first; n < last; n++) {
            float *xp = scratch + n * Cin * Hp * Wp;
            pad_sample(x, s, xp, n, Cin, H, W, ph, pw);
            for (long tap = 0; tap < total; tap++) {
                long co = tap / (Cin * taps), rest = tap % (Cin * taps);
                long ci = rest / taps, kh = (rest % taps) / KW, kw = rest % KW;
                const float *gc = g + (n * Cout + co) * Ho * Wo;
                const float *xs = xp + ci * Hp * Wp + kh * dh * Wp + kw * dw;
                if (Wo < LANES) {
                    float sum = 0.0f;
                    for (long oh = 0; oh < Ho; oh++)
                        for (long ow = 0; ow < Wo; ow++) sum += gc[oh * Wo + ow] * xs[oh * Wp + ow];
                    sums[tap] += sum;
                    continue;
                }
                v8 acc[2] = {{0}, {0}}; /* two chains, alternate rows: the adds overlap */
                for (long oh = 0; oh < Ho; oh++) {
                    const float *grow = gc + oh * Wo, *xrow = xs + oh * Wp;
                    v8 a = acc[oh & 1];
                    for (long ow = 0; ow + LANES <= Wo; ow += LANES) a += load8(grow + ow) * load8(xrow + ow);
                    if (tail) a += mask * load8(grow + Wo - LANES) * load8(xrow + Wo - LANES);
                    acc[oh & 1] = a;
                }
                v8 both = acc[0] + acc[1];
                float sum = 0.0f;
                for (long l = 0; l < LANES; l++) sum += both[l];
                sums[tap] += sum;
            }
        }
    }
    for (long t = 0; t < total; t++) {
        double sum = 0.0;
        for (long part = 0; part < parts; part++) sum += partial[part * total + t];
        gw[t] = (float)sum;
    }
}
