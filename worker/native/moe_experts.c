/* The routed experts of one MoE layer for a few token rows per expert (CPU, float32).
 *
 * In a decode step each expert sees a handful of rows (32 sequences, top-2
 * of 8 experts: about 8 each), so its SwiGLU is two matrix products that
 * read every weight once and do little arithmetic per weight: the time is
 * the weight stream. Library GEMMs are tuned for large products; at a
 * handful of rows, with one call per matrix and per expert, they reach
 * about two thirds of the memory bandwidth. This kernel computes every
 * expert of the layer in one call, straight from the checkpoint layout
 * (w13 [E, 2I, H]: gate rows then up rows; w2 [E, H, I]): each weight row
 * is read once and multiplied with all of its expert's token rows, the
 * threads split each matrix's rows between them, and the SwiGLU, the
 * routing weights and the sum over each token's experts are fused in.
 *
 *   out[t] = sum over the (token t, expert e, weight g) assignments of
 *            g * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t]))
 *
 * Assignments come grouped by expert: rows [offset_e, offset_e + counts[e])
 * of token_of / weight_of belong to expert e. Experts with wanted[e] == 0
 * are skipped (expert parallelism: another process computes them).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE_ROWS 8 /* token rows multiplied with each weight row per pass */
#define PREFETCH_ROWS 8

/* dots[m][j] = row m of x . weight row j, for m < rows (<= TILE_ROWS) and j < 2; inputs are length k_len. */
static inline __attribute__((always_inline)) void tile_dots(const float *const *x, int rows, const float *w0,
                                                            const float *w1, int64_t k_len, float dots[][2]) {
#if defined(__AVX512F__)
    if (k_len % 16 == 0) {
        __m512 acc0[TILE_ROWS], acc1[TILE_ROWS];
        for (int m = 0; m < rows; m++) acc0[m] = acc1[m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < k_len; k += 16) {
            /* the weight rows stream from memory: ask for the lines PREFETCH_ROWS rows ahead */
            _mm_prefetch((const char *)(w0 + k + PREFETCH_ROWS * k_len), _MM_HINT_T1);
            _mm_prefetch((const char *)(w1 + k + PREFETCH_ROWS * k_len), _MM_HINT_T1);
            const __m512 a = _mm512_loadu_ps(w0 + k), b = _mm512_loadu_ps(w1 + k);
            for (int m = 0; m < rows; m++) {
                const __m512 xm = _mm512_loadu_ps(x[m] + k);
                acc0[m] = _mm512_fmadd_ps(xm, a, acc0[m]);
                acc1[m] = _mm512_fmadd_ps(xm, b, acc1[m]);
            }
        }
        for (int m = 0; m < rows; m++) {
            dots[m][0] = _mm512_reduce_add_ps(acc0[m]);
            dots[m][1] = _mm512_reduce_add_ps(acc1[m]);
        }
        return;
    }
#endif
    for (int m = 0; m < rows; m++) {
        float d0 = 0.0f, d1 = 0.0f;
#pragma omp simd reduction(+ : d0, d1)
        for (int64_t k = 0; k < k_len; k++) {
            d0 += x[m][k] * w0[k];
            d1 += x[m][k] * w1[k];
        }
        dots[m][0] = d0;
        dots[m][1] = d1;
    }
}

/* The same for a compile-time row count, so that the accumulators stay in registers. */
#define TILE_CASE(n)                                 \
    case n:                                          \
        tile_dots(x, n, w0, w1, k_len, dots);        \
        break;

static void tile(const float *const *x, int rows, const float *w0, const float *w1, int64_t k_len, float dots[][2]) {
    switch (rows) {
        TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
    }
}

/* Token rows times weight rows: for m < count and n < n_out, dot(in row m, w row n) is stored into
   out[out_row(m)][n] (weights == NULL) or added to it times weights[m]. Input row m is in + in_rows[m] * in_stride
   (in_rows == NULL: row m itself); out_row(m) is out_rows[m] (NULL: m). The threads split the weight rows, so no two
   write the same output column; an expert sees each token once, so the sums need no locks. */
typedef struct {
    const float *in;
    const int64_t *in_rows;
    int64_t in_stride;
    float *out;
    const int64_t *out_rows;
    int64_t out_stride;
    const float *weights;
} Rows;

static void project(const Rows *io, int64_t count, const float *w, int64_t k_len, int64_t n_out) {
    float dots[TILE_ROWS][2];
    const float *rows[TILE_ROWS];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < n_out; n += 2) {
        const float *w0 = w + n * k_len, *w1 = n + 1 < n_out ? w0 + k_len : w0;
        const int pair = n + 1 < n_out ? 2 : 1;
        for (int64_t m0 = 0; m0 < count; m0 += TILE_ROWS) {
            const int tile_rows = count - m0 < TILE_ROWS ? (int)(count - m0) : TILE_ROWS;
            for (int m = 0; m < tile_rows; m++)
                rows[m] = io->in + (io->in_rows ? io->in_rows[m0 + m] : m0 + m) * io->in_stride;
            tile(rows, tile_rows, w0, w1, k_len, dots);
            for (int m = 0; m < tile_rows; m++) {
                float *dest = io->out + (io->out_rows ? io->out_rows[m0 + m] : m0 + m) * io->out_stride + n;
                for (int j = 0; j < pair; j++) dest[j] = io->weights ? dest[j] + io->weights[m0 + m] * dots[m][j] : dots[m][j];
            }
        }
    }
}

/* hidden[m][:I] = silu(gate) * up, in place, for this thread's share of the rows. */
static void swiglu(int64_t count, int64_t inter, float *hidden) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < count; m++) {
        float *row = hidden + m * 2 * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) row[i] = row[i] / (1.0f + expf(-row[i])) * row[inter + i];
    }
}

/* x [T, H]; token_of, weight_of [R] grouped by expert; counts, wanted [E]; w13 [E, 2I, H]; w2 [E, H, I];
   scratch [max count, 2I]; out [T, H] (overwritten). Returns 0, or 2 when an assignment names no row of x. */
int moemesh_moe_experts(const float *x, int64_t num_tokens, const int64_t *token_of, const float *weight_of,
                         const int64_t *counts, const uint8_t *wanted, int64_t num_experts, const float *w13,
                         const float *w2, int64_t hidden_size, int64_t inter, float *scratch, float *out,
                         int num_threads) {
    int64_t assignments = 0;
    for (int64_t e = 0; e < num_experts; e++) assignments += counts[e];
    for (int64_t r = 0; r < assignments; r++)
        if (token_of[r] < 0 || token_of[r] >= num_tokens) return 2;
    memset(out, 0, sizeof(float) * (size_t)(num_tokens * hidden_size));
#pragma omp parallel num_threads(num_threads)
    {
        int64_t offset = 0;
        for (int64_t e = 0; e < num_experts; e++) {
            const int64_t count = counts[e], first = offset;
            offset += count;
            if (count == 0 || !wanted[e]) continue;
            /* each `omp for` ends in a barrier: a stage's rows are complete before the next reads them */
            const Rows gate_up = {x, token_of + first, hidden_size, scratch, NULL, 2 * inter, NULL};
            project(&gate_up, count, w13 + e * 2 * inter * hidden_size, hidden_size, 2 * inter);
            swiglu(count, inter, scratch);
            const Rows down = {scratch, NULL, 2 * inter, out, token_of + first, hidden_size, weight_of + first};
            project(&down, count, w2 + e * hidden_size * inter, inter, hidden_size);
        }
    }
    return 0;
}
