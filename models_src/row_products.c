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
