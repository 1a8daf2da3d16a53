/* Fable's kernels for decoding on a CPU: a GPT block's one-token step, and its parts.

   A decoding step multiplies one row (or a few) by every weight matrix. The weights are
   read once per step, so the time is the speed at which they stream from the caches or
   memory; BLAS libraries tune for many rows and leave a lone row on one core. Here each
   weight matrix is packed into column tiles, [out / TILE][in][TILE], so that one tile is one
   contiguous stream, the tiles are shared among the threads, and a tile's TILE sums stay in
   vector registers over the whole input. Around the products, a block's small operations
   (layer norms, attention, GELU, residuals) cost more in calls than in arithmetic, so
   block_one_token runs the whole block in one call and one OpenMP team. Plain C that the
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
                v = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
            else if (mode == GELU_TANH)
                v = 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
            y[(size_t)r * ldy + k] = v;
        }
}

/* One tile, up to ROWS rows. The full-ROWS case is its own loop so that the compiler
   unrolls the rows and keeps every sum in a register. */
#define DEFINE_TILE(NAME, WEIGHT, WEIGHTS_OF_INPUT)                                       \
    static void NAME(int rows, const float *x, int ldx, const WEIGHT *w, int in,          \
                     float acc[ROWS][TILE]) {                                             \
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
            float acc[ROWS][TILE] = {{0}};
            if (L->int8)
                tile_i8(rows, x + (size_t)r0 * L->in, L->in, (const int8_t *)L->weight + tile, L->in, acc);
            else
                tile_f32(rows, x + (size_t)r0 * L->in, L->in, (const float *)L->weight + tile, L->in, acc);
            finish(rows, acc, L->bias ? L->bias + t * TILE : NULL,
                   L->scale ? L->scale + t * TILE : NULL, y + at, L->out, width, mode,
                   residual ? residual + at : NULL);
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
                    const float factor = expf(top - chunk_top);
                    total *= factor;
                    for (int d = 0; d < dim; d++) acc[d] *= factor;
                    top = chunk_top;
                }
                for (int j = 0; j < n; j++) {
                    const float p = expf(score[j] - top);
                    const float *value = values + (size_t)(start + j) * dim;
                    total += p;
                    for (int d = 0; d < dim; d++) acc[d] += p * value[d];
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

/* out = x + attn(ln_1(x)); out += mlp(ln_2(out)): a pre-LayerNorm block's one-token step
   (models_src.layers.Block.forward) for rows (rows, C), the cache as in attend. scratch
   holds rows * (5 C + hidden) floats. Each stage ends at its loop's barrier. */
void block_one_token(const Block *B, int rows, const float *x, float *out, float *scratch,
                     float *k_cache, float *v_cache, int positions, const int *position,
                     int threads) {
    const int C = B->proj.out, dim = C / B->heads;
    float *h = scratch, *qkv = h + (size_t)rows * C, *att = qkv + (size_t)rows * 3 * C;
    float *hidden = att + (size_t)rows * C;
    _Pragma("omp parallel num_threads(threads) if(threads > 1)")
    {
        layer_norm(rows, C, x, B->ln1_weight, B->ln1_bias, B->ln1_eps, h);
        product(&B->qkv, rows, h, qkv, PLAIN, NULL);
        attend(rows, B->heads, dim, qkv, k_cache, v_cache, positions, position, att);
        product(&B->proj, rows, att, out, RESIDUAL, x);
        layer_norm(rows, C, out, B->ln2_weight, B->ln2_bias, B->ln2_eps, h);
        product(&B->fc, rows, h, hidden, B->gelu, NULL);
        product(&B->mlp, rows, hidden, out, RESIDUAL, out);
    }
}
