/* Fable's kernels for decoding on a CPU: a GPT's one-token step, and its products.

   A decoding step multiplies one row (or a few) by every weight matrix. The weights are
   read once per step, so the time is the speed at which they stream from the caches or
   memory; BLAS libraries tune for many rows and leave a lone row on one core. Here each
   weight matrix is packed into column tiles, [out / TILE][in][TILE], so that one tile is one
   contiguous stream, the tiles are shared among the threads, and a tile's TILE sums stay in
   vector registers over the whole input. Around the products, a block's small operations
   (layer norms, attention, GELU, residuals) cost more in calls than in arithmetic, so
   gpt_one_token runs a whole one-token step, every block and the head, in one call and
   one OpenMP team. Plain C that the
   compiler vectorizes for the machine it builds on (-march=native);
   models_src/row_products.py builds and loads it.

   int8 weights are quantized per output column (nn.Linear's output row) with a float scale,
   the rows X stay float: Y = (X Q) * scale + b. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* A tile is 4 vector registers wide; ROWS rows' sums and one input's weights fill at
   most 20 of the 32 AVX-512 registers, and 16 of AVX2's 16 (spilling none of the sums). */
#if defined(__AVX512F__)
#define TILE 64
#define ROWS 4
#else
#define TILE 32
#define ROWS 3
#endif

int row_products_tile(void) { return TILE; }

typedef struct {
    const void *weight; /* packed [tiles][in][TILE], float or int8_t */
    const float *bias;  /* padded to whole tiles, or NULL */
    const float *scale; /* int8: padded to whole tiles; else NULL */
    int in, out, int8;
} Linear;

/* expf and erff as the compiler can vectorize them (libm's are calls, one value at a time;
   a one-token step takes thousands of each). exp: Cephes' expf, x = n ln2 + r, its
   polynomial for e^r and 2^n put into the exponent bits; within 2 ulp for |x| < 87.
   erf: Abramowitz and Stegun 7.1.26, absolute error under 1.5e-7. */
static inline float exp_approx(float x) {
    x = x < -87.f ? -87.f : (x > 87.f ? 87.f : x);
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f; /* round to nearest */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

static inline float erf_approx(float x) {
    const float a = x < 0.f ? -x : x, t = 1.f / (1.f + 0.3275911f * a);
    const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                     + t * (-1.453152027f + t * 1.061405429f))));
    const float y = 1.f - poly * exp_approx(-a * a);
    return x < 0.f ? -y : y;
}

/* What a product's result becomes: as is, plus a residual of the same shape, or GELU'd */
enum { PLAIN = 0, RESIDUAL = 1, GELU_ERF = 2, GELU_TANH = 3 };

static void finish(int rows, float acc[ROWS][TILE], const float *bias, const float *scale,
                   float *y, int ldy, int width, int mode, const float *residual) {
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < width; k++) {
            float v = (scale ? acc[r][k] * scale[k] : acc[r][k]) + (bias ? bias[k] : 0.f);
            if (mode == RESIDUAL)
                v += residual[(size_t)r * ldy + k];
            else if (mode == GELU_ERF)
                v = 0.5f * v * (1.f + erf_approx(v * 0.70710678118654752f));
            else if (mode == GELU_TANH) /* tanh(u) = 1 - 2 / (e^2u + 1) */
                v = 0.5f * v * (2.f - 2.f / (exp_approx(1.5957691216057307f * (v + 0.044715f * v * v * v)) + 1.f));
            y[(size_t)r * ldy + k] = v;
        }
}

/* One tile, up to ROWS rows, finished into y. The sums are the function's own (not its
   caller's) so that they live in registers, and the full-ROWS case is its own loop so that
   the compiler unrolls the rows. */
#define DEFINE_TILE(NAME, WEIGHT, WEIGHTS_OF_INPUT)                                       \
    static void NAME(int rows, const float *x, int ldx, const WEIGHT *w, int in,          \
                     const float *bias, const float *scale, float *y, int ldy, int width, \
                     int mode, const float *residual) {                                   \
        float acc[ROWS][TILE] = {{0}};                                                    \
        if (rows == ROWS) {                                                               \
            for (int i = 0; i < in; i++) {                                                \
                WEIGHTS_OF_INPUT                                                          \
                for (int r = 0; r < ROWS; r++) {                                          \
                    const float xi = x[(size_t)r * ldx + i];                              \
                    for (int k = 0; k < TILE; k++) acc[r][k] += xi * wi[k];               \
                }                                                                         \
            }                                                                             \
        } else {                                                                          \
            for (int i = 0; i < in; i++) {                                                \
                WEIGHTS_OF_INPUT                                                          \
                for (int r = 0; r < rows; r++) {                                          \
                    const float xi = x[(size_t)r * ldx + i];                              \
                    for (int k = 0; k < TILE; k++) acc[r][k] += xi * wi[k];               \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
        finish(rows, acc, bias, scale, y, ldy, width, mode, residual);                    \
    }

/* wi: input i's TILE weights as floats; int8 ones are converted once for all the rows */
DEFINE_TILE(tile_f32, float, const float *wi = w + (size_t)i * TILE;)
DEFINE_TILE(tile_i8, int8_t, float wi[TILE];
            for (int k = 0; k < TILE; k++) wi[k] = (float)w[(size_t)i * TILE + k];)

/* y (m, out) = x (m, in) W, finished by `mode`; the tiles are shared among the threads of
   the team this runs in (a worksharing loop: every thread of the team calls it). */
static void product(const Linear *L, int m, const float *x, float *y, int mode,
                    const float *residual) {
    const int tiles = (L->out + TILE - 1) / TILE, passes = (m + ROWS - 1) / ROWS;
    _Pragma("omp for collapse(2) schedule(static)")
    for (int t = 0; t < tiles; t++)
        for (int p = 0; p < passes; p++) {
            const int r0 = p * ROWS, rows = m - r0 < ROWS ? m - r0 : ROWS;
            const int width = L->out - t * TILE < TILE ? L->out - t * TILE : TILE;
            const size_t tile = (size_t)t * L->in * TILE, at = (size_t)r0 * L->out + t * TILE;
            const float *bias = L->bias ? L->bias + t * TILE : NULL;
            const float *scale = L->scale ? L->scale + t * TILE : NULL;
            const float *res = residual ? residual + at : NULL;
            if (L->int8)
                tile_i8(rows, x + (size_t)r0 * L->in, L->in, (const int8_t *)L->weight + tile,
                        L->in, bias, scale, y + at, L->out, width, mode, res);
            else
                tile_f32(rows, x + (size_t)r0 * L->in, L->in, (const float *)L->weight + tile,
                         L->in, bias, scale, y + at, L->out, width, mode, res);
        }
}

/* y (m, out) = x (m, in) W + bias: one product on its own */
void row_product(const Linear *L, int m, const float *x, float *y, int threads) {
    _Pragma("omp parallel num_threads(threads) if(threads > 1)")
    product(L, m, x, y, PLAIN, NULL);
}

static void layer_norm(int rows, int C, const float *x, const float *weight, const float *bias,
                       float eps, float *y) {
    _Pragma("omp for schedule(static)")
    for (int r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * C;
        float mean = 0.f, var = 0.f;
        for (int c = 0; c < C; c++) mean += row[c];
        mean /= C;
        for (int c = 0; c < C; c++) var += (row[c] - mean) * (row[c] - mean);
        const float inv = 1.f / sqrtf(var / C + eps);
        for (int c = 0; c < C; c++)
            y[(size_t)r * C + c] = (row[c] - mean) * inv * weight[c] + (bias ? bias[c] : 0.f);
    }
}

/* One-token self-attention: for each row b and head h, the token's key and value (in qkv:
   query, key, value of C = heads * dim each) are stored at position[b] of the layer's cache
   (rows, heads, positions, dim), then its query attends to positions 0..position[b],
   softmax over scaled dot products, into y (rows, C). The softmax runs online over chunks
   of keys (no buffer as long as the context). */
#define KEYS 64
#define MAX_DIM 256

static void attend(int rows, int heads, int dim, const float *qkv, float *k_cache,
                   float *v_cache, int positions, const int *position, float *y) {
    const int C = heads * dim;
    const float scale = 1.0f / sqrtf((float)dim);
    _Pragma("omp for collapse(2) schedule(static)")
    for (int b = 0; b < rows; b++)
        for (int h = 0; h < heads; h++) {
            const float *q = qkv + (size_t)b * 3 * C + (size_t)h * dim;
            const size_t head = ((size_t)b * heads + h) * positions * dim;
            float *keys = k_cache + head, *values = v_cache + head;
            const int last = position[b];
            for (int d = 0; d < dim; d++) {
                keys[(size_t)last * dim + d] = q[C + d];
                values[(size_t)last * dim + d] = q[2 * C + d];
            }
            float acc[MAX_DIM] = {0}, score[KEYS], top = -INFINITY, total = 0.f;
            for (int start = 0; start <= last; start += KEYS) {
                const int n = last + 1 - start < KEYS ? last + 1 - start : KEYS;
                float chunk_top = -INFINITY;
                for (int j = 0; j < n; j++) {
                    const float *key = keys + (size_t)(start + j) * dim;
                    float s = 0.f;
                    _Pragma("omp simd reduction(+:s)") /* lanes of partial sums */
                    for (int d = 0; d < dim; d++) s += q[d] * key[d];
                    score[j] = s * scale;
                    chunk_top = score[j] > chunk_top ? score[j] : chunk_top;
                }
                if (chunk_top > top) { /* rescale what was summed against the new maximum */
                    const float factor = top == -INFINITY ? 0.f : exp_approx(top - chunk_top);
                    total *= factor;
                    for (int d = 0; d < dim; d++) acc[d] *= factor;
                    top = chunk_top;
                }
                for (int j = 0; j < n; j++) score[j] = exp_approx(score[j] - top);
                for (int j = 0; j < n; j++) {
                    const float *value = values + (size_t)(start + j) * dim;
                    total += score[j];
                    for (int d = 0; d < dim; d++) acc[d] += score[j] * value[d];
                }
            }
            float *out = y + (size_t)b * C + (size_t)h * dim;
            for (int d = 0; d < dim; d++) out[d] = acc[d] / total;
        }
}

typedef struct {
    const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias; /* biases may be NULL */
    float ln1_eps, ln2_eps;
    Linear qkv, proj, fc, mlp;
    int heads, gelu; /* GELU_ERF or GELU_TANH */
} Block;

typedef struct {
    const Block *blocks;
    int layers;
    const float *ln_weight, *ln_bias; /* the final layer norm; its bias may be NULL */
    float ln_eps;
    Linear head;
} Model;

/* out = x + attn(ln_1(x)); out += mlp(ln_2(out)): a pre-LayerNorm block's one-token step
   (models_src.layers.Block.forward) on rows (rows, C), the layer's cache as in attend, in
   the team this runs in. scratch holds rows * (5 C + hidden) floats. Each stage ends at its
   loop's barrier. */
static void block_step(const Block *B, int rows, const float *x, float *out, float *scratch,
                       float *k_cache, float *v_cache, int positions, const int *position) {
    const int C = B->proj.out, dim = C / B->heads;
    float *h = scratch, *qkv = h + (size_t)rows * C, *att = qkv + (size_t)rows * 3 * C;
    float *hidden = att + (size_t)rows * C;
    layer_norm(rows, C, x, B->ln1_weight, B->ln1_bias, B->ln1_eps, h);
    product(&B->qkv, rows, h, qkv, PLAIN, NULL);
    attend(rows, B->heads, dim, qkv, k_cache, v_cache, positions, position, att);
    product(&B->proj, rows, att, out, RESIDUAL, x);
    layer_norm(rows, C, out, B->ln2_weight, B->ln2_bias, B->ln2_eps, h);
    product(&B->fc, rows, h, hidden, B->gelu, NULL);
    product(&B->mlp, rows, hidden, out, RESIDUAL, out);
}

/* A GPT's one-token step from its embedded rows x (rows, C) to the logits (rows, vocab):
   every block, the final layer norm and the head, in one OpenMP team. The cache is every
   layer's (layers, capacity, heads, positions, dim); scratch holds
   rows * (7 C + hidden) floats. */
void gpt_one_token(const Model *M, int rows, const float *x, float *logits, float *scratch,
                   float *k_cache, float *v_cache, int capacity, int positions,
                   const int *position, int threads) {
    const int C = M->blocks[0].proj.out;
    const size_t layer = (size_t)capacity * C * positions; /* heads * dim = C */
    float *a = scratch, *b = a + (size_t)rows * C, *work = b + (size_t)rows * C;
    _Pragma("omp parallel num_threads(threads) if(threads > 1)")
    {
        const float *in = x;
        for (int l = 0; l < M->layers; l++) {
            float *out = l % 2 ? b : a;
            block_step(&M->blocks[l], rows, in, out, work, k_cache + l * layer,
                       v_cache + l * layer, positions, position);
            in = out;
        }
        layer_norm(rows, C, in, M->ln_weight, M->ln_bias, M->ln_eps, work);
        product(&M->head, rows, work, logits, PLAIN, NULL);
    }
}
