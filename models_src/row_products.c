/* Fable's matrix products for decoding on a CPU: Y = X W + b for a few rows X.

   A decoding step multiplies one row (or a few) by every weight matrix. The weights are
   read once per step, so the time is the speed at which they stream from the caches or
   memory; BLAS libraries tune for many rows and leave a lone row on one core. Here each
   weight matrix is packed into column tiles, [out / TILE][in][TILE], so that one tile is one
   contiguous stream, the tiles are shared among the threads, and a tile's TILE sums stay in
   vector registers over the whole input. Plain C that the compiler vectorizes for the
   machine it builds on (-march=native); models_src/row_products.py builds and loads it.

   int8 weights are quantized per output column (nn.Linear's output row) with a float scale,
   the rows X stay float: Y = (X Q) * scale + b. */

#include <stddef.h>
#include <math.h>
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

static void finish(int rows, float acc[ROWS][TILE], const float *bias, const float *scale,
                   float *y, int ldy, int width) {
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < width; k++)
            y[(size_t)r * ldy + k] = (scale ? acc[r][k] * scale[k] : acc[r][k]) + (bias ? bias[k] : 0.f);
}

/* One tile, up to ROWS rows. The full-ROWS case is its own loop so that the compiler
   unrolls the rows and keeps every sum in a register. */
#define DEFINE_TILE(NAME, WEIGHT, WEIGHTS_OF_INPUT)                                       \
    static void NAME(int rows, const float *x, int ldx, const WEIGHT *w, int in,          \
                     const float *bias, const float *scale, float *y, int ldy, int width) { \
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
        finish(rows, acc, bias, scale, y, ldy, width);                                    \
    }

/* wi: input i's TILE weights as floats; int8 ones are converted once for all the rows */
DEFINE_TILE(tile_f32, float, const float *wi = w + (size_t)i * TILE;)
DEFINE_TILE(tile_i8, int8_t, float wi[TILE];
            for (int k = 0; k < TILE; k++) wi[k] = (float)w[(size_t)i * TILE + k];)

/* y (m, out) = x (m, in) w + bias, w packed as above (out rounded up to whole tiles, the
   bias and scale padded alike); bias and scale may be NULL. */
#define DEFINE_PRODUCT(NAME, TILE_FN, WEIGHT)                                             \
    void NAME(int m, const float *x, const WEIGHT *w, const float *bias,                  \
              const float *scale, float *y, int in, int out, int threads) {               \
        const int tiles = (out + TILE - 1) / TILE, passes = (m + ROWS - 1) / ROWS;        \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(threads) if(threads > 1)") \
        for (int t = 0; t < tiles; t++)                                                   \
            for (int p = 0; p < passes; p++) {                                            \
                const int r0 = p * ROWS, rows = m - r0 < ROWS ? m - r0 : ROWS;            \
                const int width = out - t * TILE < TILE ? out - t * TILE : TILE;          \
                TILE_FN(rows, x + (size_t)r0 * in, in, w + (size_t)t * in * TILE, in,     \
                        bias ? bias + t * TILE : NULL, scale ? scale + t * TILE : NULL,   \
                        y + (size_t)r0 * out + t * TILE, out, width);                     \
            }                                                                             \
    }

DEFINE_PRODUCT(row_products_f32, tile_f32, float)
DEFINE_PRODUCT(row_products_i8, tile_i8, int8_t)

/* A one-token step's self-attention, every row at the same length: for each row b and
   head h, the token's key and value (in qkv: query, key, value of C = heads * dim each) are
   stored at `position` of the layer's cache (rows, heads, positions, dim), then its query
   attends to positions 0..position, softmax over scaled dot products, into y (rows, C).
   The softmax runs online over chunks of keys (no buffer as long as the context). */
#define KEYS 64
#define MAX_DIM 256

void attend_one_token(int rows, int heads, int dim, const float *qkv, float *k_cache,
                      float *v_cache, int positions, int position, float *y, int threads) {
    const int C = heads * dim;
    const float scale = 1.0f / sqrtf((float)dim);
    _Pragma("omp parallel for collapse(2) schedule(static) num_threads(threads) if(threads > 1)")
    for (int b = 0; b < rows; b++)
        for (int h = 0; h < heads; h++) {
            const float *q = qkv + (size_t)b * 3 * C + (size_t)h * dim;
            const size_t head = ((size_t)b * heads + h) * positions * dim;
            float *keys = k_cache + head, *values = v_cache + head;
            for (int d = 0; d < dim; d++) {
                keys[(size_t)position * dim + d] = q[C + d];
                values[(size_t)position * dim + d] = q[2 * C + d];
            }
            float acc[MAX_DIM] = {0}, score[KEYS], top = -INFINITY, total = 0.f;
            for (int start = 0; start <= position; start += KEYS) {
                const int n = position + 1 - start < KEYS ? position + 1 - start : KEYS;
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
