/* The routed experts of one MoE layer (CPU, float32), every expert in one call; and, with the same tile,
 * the dense projections of small decode batches (moemesh_linear).
 *
 * In a decode step each expert sees a handful of rows (32 sequences, top-2
 * of 8 experts: about 8 each), so its SwiGLU is two matrix products that
 * read every weight once and do about as much arithmetic per weight as the
 * cores can keep up with. Library GEMMs are tuned for large products; at a
 * handful of rows, with one call per matrix and per expert, they reach
 * about two thirds of the memory bandwidth. This kernel takes the router's
 * choices as they are, groups them by expert, and computes every expert of
 * the layer straight from the checkpoint layout (w13 [E, 2I, H]: gate rows
 * then up rows; w2 [E, H, I]):
 *
 *   out[t] = sum over the (token t, expert e, weight g) assignments of
 *            g * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t]))
 *
 * Two stages, one barrier between them. Stage 1: each thread owns a range of
 * intermediate columns of every expert and computes the gate and up dots of
 * those columns, then the SwiGLU over them. Stage 2: each thread owns a
 * range of output columns and adds every expert's weighted down projection
 * into them; a column has one writer, so the sums need no locks.
 *
 * The inner tile multiplies 4 weight rows with up to 6 token rows (24
 * accumulators), loads each operand into a register once, and turns the 24
 * accumulators into sums with a transposing shuffle tree rather than one
 * horizontal reduction each. Prefill-sized batches take an expert's rows
 * ROW_BLOCK at a time, which keeps the tile fed from L2.
 *
 * Experts with wanted[e] == 0 are skipped (expert parallelism: another
 * process computes them).
 *
 * The models lay their experts out once in panels instead (see "The experts
 * from panel-packed weights" below), which the same entry point reads with
 * `packed` set: a broadcast tile without horizontal sums, 1.08x faster at a
 * decode step and 1.15x at prefill. The checkpoint layout stays for expert
 * sizes the panels cannot hold, and its tile for the dense projections.
 *
 * On panels the threads do not own fixed shares: stage 1 is cut into items
 * of (expert, PK_ITEM_PANELS panels), stage 2 into one item per output
 * panel (all experts, so a column still has one writer), and each thread
 * takes the next item when it finishes one. A worker shares its cores with
 * the gateway, the scheduler and gRPC's threads, and a thread the system
 * preempts then holds up one item instead of its half of the layer. In two
 * runs of bench/contention_bench.py, beside a process waking 625 times a
 * second for 0.1 ms, a 32-sequence decode step lost 1.0-5.1% instead of
 * 6.2-8.1%, and beside 15 ms bursts every 65 ms 10.8-13.9% instead of
 * 13.5-15.8%, with the same time alone.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "simd.h"

#define W_ROWS 4        /* weight rows per tile */
#define T_ROWS 6        /* token rows per tile, at most */
#define PREFETCH_ROWS 6 /* how far ahead (in weight rows) the stream is requested, on every pass */
#define PANEL 32        /* weight rows held in L2 while a block of token rows passes */
#define ROW_BLOCK 128   /* token rows held in L2 while a panel of weight rows passes */

/* dots[m][j] = x row m . weight row j, for m < rows (<= T_ROWS) and j < W_ROWS; every row is k_len long.
   The weight rows PREFETCH_ROWS ahead are requested into L2 as this tile reads its own: on this kind of
   machine the hardware prefetcher alone reaches about half the bandwidth of a plain read
   (bench/native_bench.py). */
static inline __attribute__((always_inline)) void tile_dots(const float *const *x, int rows, const float *const *w,
                                                            int64_t k_len, float dots[T_ROWS][W_ROWS]) {
#if defined(__AVX512F__)
    if (k_len % 16 == 0) {
        __m512 acc[T_ROWS * W_ROWS]; /* acc[m * W_ROWS + j] */
#pragma GCC unroll 24
        for (int i = 0; i < rows * W_ROWS; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t k = 0; k < k_len; k += 16) {
            __m512 wv[W_ROWS];
#pragma GCC unroll 4
            for (int j = 0; j < W_ROWS; j++) {
                _mm_prefetch((const char *)(w[j] + k + PREFETCH_ROWS * k_len), _MM_HINT_T1);
                wv[j] = _mm512_loadu_ps(w[j] + k);
                IN_REGISTER(wv[j]);
            }
#pragma GCC unroll 6
            for (int m = 0; m < rows; m++) {
                __m512 xm = _mm512_loadu_ps(x[m] + k);
                IN_REGISTER(xm);
#pragma GCC unroll 4
                for (int j = 0; j < W_ROWS; j++) acc[m * W_ROWS + j] = _mm512_fmadd_ps(xm, wv[j], acc[m * W_ROWS + j]);
            }
        }
        float sums[32];
#pragma GCC unroll 2
        for (int half = 0; half * 16 < rows * W_ROWS; half++) {
            __m512 part[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++)
                part[i] = half * 16 + i < rows * W_ROWS ? acc[half * 16 + i] : _mm512_setzero_ps();
            _mm512_storeu_ps(sums + 16 * half, hsum16(part));
        }
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < W_ROWS; j++) {
                const int i = m * W_ROWS + j;
                dots[m][j] = sums[16 * (i / 16) + SUM_LANE(i % 16)];
            }
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (k_len % 8 == 0) {
        /* Token rows two at a time against the 4 weight rows: 8 accumulators, 4 weight vectors and a token
           vector fit the 16 registers; the later pairs read the weight rows again from L1. */
#pragma GCC unroll 3
        for (int g = 0; g < rows; g += 2) {
            const int pair = rows - g < 2 ? rows - g : 2;
            __m256 acc[2 * W_ROWS];
#pragma GCC unroll 8
            for (int i = 0; i < 2 * W_ROWS; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t k = 0; k < k_len; k += 8) {
                __m256 wv[W_ROWS];
#pragma GCC unroll 4
                for (int j = 0; j < W_ROWS; j++) {
                    if (g == 0) _mm_prefetch((const char *)(w[j] + k + PREFETCH_ROWS * k_len), _MM_HINT_T1);
                    wv[j] = _mm256_loadu_ps(w[j] + k);
                    IN_REGISTER(wv[j]);
                }
#pragma GCC unroll 2
                for (int m = 0; m < pair; m++) {
                    __m256 xm = _mm256_loadu_ps(x[g + m] + k);
                    IN_REGISTER(xm);
#pragma GCC unroll 4
                    for (int j = 0; j < W_ROWS; j++) acc[m * W_ROWS + j] = _mm256_fmadd_ps(xm, wv[j], acc[m * W_ROWS + j]);
                }
            }
            float sums[2 * W_ROWS];
            _mm256_storeu_ps(sums, hsum8(acc));
            for (int m = 0; m < pair; m++)
                for (int j = 0; j < W_ROWS; j++) dots[g + m][j] = sums[m * W_ROWS + j];
        }
        return;
    }
#endif
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < W_ROWS; j++) {
            float d = 0.0f;
#pragma omp simd reduction(+ : d)
            for (int64_t k = 0; k < k_len; k++) d += x[m][k] * w[j][k];
            dots[m][j] = d;
        }
}

/* The same for a compile-time row count, so that the accumulators stay in registers. */
#define TILE_CASE(n)                     \
    case n:                              \
        tile_dots(x, n, w, k_len, dots); \
        break;

static void tile(const float *const *x, int rows, const float *const *w, int64_t k_len, float dots[T_ROWS][W_ROWS]) {
    switch (rows) {
        TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
    }
}

/* Token rows [0, count) split into `tiles` tiles of near-equal size: tile `index` starts at *first. */
static inline int tile_rows(int64_t count, int64_t tiles, int64_t index, int64_t *first) {
    const int64_t size = count / tiles, extra = count % tiles;
    *first = index * size + (index < extra ? index : extra);
    return (int)(size + (index < extra));
}

/* This thread's share [*lo, *hi) of n columns, in multiples of `step`. */
static inline void thread_range(int64_t n, int64_t step, int64_t *lo, int64_t *hi) {
    const int threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t chunks = (n + step - 1) / step, per = (chunks + threads - 1) / threads;
    *lo = me * per * step < n ? me * per * step : n;
    *hi = (me + 1) * per * step < n ? (me + 1) * per * step : n;
}

/* The loops of both stages are blocked for the caches: a panel of PANEL weight rows is multiplied with a
   block of ROW_BLOCK token rows at a time, both held in L2, so that the weights stream from memory once
   per call and each token row is read once per panel. At decode sizes there is one block. */
static inline int64_t block_end(int64_t start, int64_t step, int64_t end) { return end - start < step ? end : start + step; }

/* Rows times weight rows, this thread's output columns [lo, hi): for m < count and column n,
   d = (in row m) . (w row n) over k_len; out[out_row(m)][n] = d, or += weights[m] * d when weights is given.
   Input row m is in + in_row(m) * in_stride, output row out + out_row(m) * out_stride; in_row(m) and
   out_row(m) are in_rows[m] and out_rows[m], or m itself where those are NULL. Both expert stages (stage 1
   reads its tokens' rows through in_rows; stage 2 adds into them through out_rows with the routing weights)
   and the dense projections. */
static void project(const float *in, const int64_t *in_rows, int64_t in_stride, int64_t count, const float *w,
                    int64_t k_len, float *out, const int64_t *out_rows, int64_t out_stride, const float *weights,
                    int64_t lo, int64_t hi) {
    const float *rows[T_ROWS], *wr[W_ROWS];
    float dots[T_ROWS][W_ROWS];
    for (int64_t p0 = lo; p0 < hi; p0 += PANEL) {
        const int64_t p1 = block_end(p0, PANEL, hi);
        for (int64_t b0 = 0; b0 < count; b0 += ROW_BLOCK) {
            const int64_t block = block_end(b0, ROW_BLOCK, count) - b0, tiles = (block + T_ROWS - 1) / T_ROWS;
            for (int64_t n = p0; n < p1; n += W_ROWS) {
                const int width = p1 - n < W_ROWS ? (int)(p1 - n) : W_ROWS;
                for (int j = 0; j < W_ROWS; j++) wr[j] = w + (n + (j < width ? j : 0)) * k_len;
                for (int64_t t = 0, first; t < tiles; t++) {
                    const int rows_n = tile_rows(block, tiles, t, &first);
                    first += b0;
                    for (int m = 0; m < rows_n; m++) rows[m] = in + (in_rows ? in_rows[first + m] : first + m) * in_stride;
                    tile(rows, rows_n, wr, k_len, dots);
                    for (int m = 0; m < rows_n; m++) {
                        float *dest = out + (out_rows ? out_rows[first + m] : first + m) * out_stride + n;
                        if (weights)
                            for (int j = 0; j < width; j++) dest[j] += weights[first + m] * dots[m][j];
                        else
                            for (int j = 0; j < width; j++) dest[j] = dots[m][j];
                    }
                }
            }
        }
    }
}

/* Stage 1 for one expert, this thread's intermediate columns [lo, hi): the gate and up dots of each token's
   row into hidden[r][i] and hidden[r][I + i], then hidden[r][i] = silu(gate) * up over the same columns (the
   thread's own, so no other thread waits for them). */
static void gate_up(const float *x, const int64_t *token_of, int64_t count, const float *w13, int64_t hidden_size,
                    int64_t inter, int64_t lo, int64_t hi, float *hidden) {
    project(x, token_of, hidden_size, count, w13, hidden_size, hidden, NULL, 2 * inter, NULL, lo, hi);
    project(x, token_of, hidden_size, count, w13 + inter * hidden_size, hidden_size, hidden + inter, NULL, 2 * inter,
            NULL, lo, hi);
    for (int64_t r = 0; r < count; r++) {
        float *h = hidden + r * 2 * inter;
#pragma omp simd
        for (int64_t i = lo; i < hi; i++) h[i] = h[i] / (1.0f + expf(-h[i])) * h[inter + i];
    }
}

/* The (token, choice) assignments grouped by expert, in token order within each (a counting sort):
   token_of / weight_of [T * k], counts [E]. An id of -1 is a choice not taken (a row with fewer choices
   than k, as expert parallelism hands a rank) and is skipped. Returns 0, or 2 when an expert id is out of
   range. */
static int group_by_expert(const int64_t *topk_ids, const float *topk_weights, int64_t num_tokens, int64_t top_k,
                           int64_t num_experts, int64_t *token_of, float *weight_of, int64_t *counts, int64_t *next) {
    for (int64_t e = 0; e < num_experts; e++) counts[e] = 0;
    for (int64_t r = 0; r < num_tokens * top_k; r++) {
        if (topk_ids[r] == -1) continue;
        if (topk_ids[r] < 0 || topk_ids[r] >= num_experts) return 2;
        counts[topk_ids[r]]++;
    }
    for (int64_t e = 0, offset = 0; e < num_experts; offset += counts[e], e++) next[e] = offset;
    for (int64_t r = 0; r < num_tokens * top_k; r++) {
        if (topk_ids[r] == -1) continue;
        const int64_t slot = next[topk_ids[r]]++;
        token_of[slot] = r / top_k, weight_of[slot] = topk_weights[r];
    }
    return 0;
}

/* ---- The experts from panel-packed weights ----
 *
 * The tile above takes dot products, so every one of its accumulators ends in a horizontal sum. At a
 * decode step's handful of rows per expert (32 sequences, top-2 of 8: about 8 rows each) the kernel is
 * bound by arithmetic as much as by memory, and those sums, the scalar stores after them and the second
 * pass over each weight group for the second tile of rows cost a good part of it. Here the weights are
 * laid out once (`moemesh.worker.native.pack_experts`) as panels of 32 columns, each panel [k_len][32]
 * contiguous:
 *
 *   p13 [E, I/16, H, 32]: panel p holds the gate columns [16p, 16p + 16) and then the up columns of the
 *                         same intermediate indices, so the SwiGLU of a panel is done as it leaves the tile;
 *   p2  [E, H/32, I, 32]: panel p holds output columns [32p, 32p + 32) of the down projection.
 *
 * The tile broadcasts one input value per row and step and multiplies it with the panel's two vectors:
 * up to PK_TOKENS rows, two accumulators each, no horizontal sums, and the weights arrive as one
 * sequential stream per thread. Threads own ranges of panels (stage 1: intermediate columns, stage 2:
 * output columns), with the same single barrier between the stages. Token rows go ROW_BLOCK at a time
 * so that they stay in L2 while the panels pass; at decode sizes there is one block and one tile, and
 * every weight is read from memory once. bench/native_bench.py measures both layouts side by side. */

#define PK_TOKENS 12  /* token rows per tile: 24 accumulators */
#define PK_AHEAD 2048 /* floats (8 KB) ahead of the tile that the weight stream is requested into L2 */
#define PK_KC 64      /* panel rows (8 KB) an AVX2 build keeps in L1 while each group of token rows passes */
#define PK_ITEM_PANELS 4 /* stage 1 panels per work item: threads take items as they go (a thread the system
                            preempts holds up one item, not its fixed share of the layer) */

/* acc_out[m][0..32) = sum over k < k_len of x[m][k] * panel[k][0..32), for m < rows (<= PK_TOKENS). */
static inline __attribute__((always_inline)) void panel_tile(const float *const *x, int rows, const float *panel, int64_t k_len,
                                                             float acc_out[PK_TOKENS][32]) {
#if defined(__AVX512F__)
    __m512 acc[2 * PK_TOKENS];
#pragma GCC unroll 24
    for (int i = 0; i < 2 * rows; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_len; k++) {
        const float *w = panel + 32 * k;
        _mm_prefetch((const char *)(w + PK_AHEAD), _MM_HINT_T1);
        _mm_prefetch((const char *)(w + PK_AHEAD + 16), _MM_HINT_T1);
        __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
        IN_REGISTER(w0);
        IN_REGISTER(w1);
#pragma GCC unroll 12
        for (int m = 0; m < rows; m++) {
            const __m512 xm = _mm512_set1_ps(x[m][k]);
            acc[2 * m] = _mm512_fmadd_ps(xm, w0, acc[2 * m]);
            acc[2 * m + 1] = _mm512_fmadd_ps(xm, w1, acc[2 * m + 1]);
        }
    }
#pragma GCC unroll 12
    for (int m = 0; m < rows; m++) {
        _mm512_storeu_ps(acc_out[m], acc[2 * m]);
        _mm512_storeu_ps(acc_out[m] + 16, acc[2 * m + 1]);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    /* Token rows in groups of 6 and the panel's 32 columns in halves of 16: 12 accumulators, two weight
       vectors and a broadcast fill the 16 registers (the usual 6x16 shape of an AVX2 matrix kernel). The
       panel passes PK_KC rows at a time (8 KB, held in L1 while every group and half reads it); the first
       pass over each block requests the stream ahead into L2, both cache lines of each row. */
    for (int64_t k0 = 0; k0 < k_len; k0 += PK_KC) {
        const int64_t k1 = k_len - k0 < PK_KC ? k_len : k0 + PK_KC;
#pragma GCC unroll 2
        for (int g = 0; g < rows; g += 6) {
            const int group = rows - g < 6 ? rows - g : 6;
            const float *xr[6];
#pragma GCC unroll 6
            for (int m = 0; m < group; m++) xr[m] = x[g + m];
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256 acc[12];
                if (k0 == 0) {
#pragma GCC unroll 12
                    for (int i = 0; i < 2 * group; i++) acc[i] = _mm256_setzero_ps();
                } else {
#pragma GCC unroll 6
                    for (int m = 0; m < group; m++) {
                        acc[2 * m] = _mm256_loadu_ps(acc_out[g + m] + 16 * h);
                        acc[2 * m + 1] = _mm256_loadu_ps(acc_out[g + m] + 16 * h + 8);
                    }
                }
                for (int64_t k = k0; k < k1; k++) {
                    const float *w = panel + 32 * k + 16 * h;
                    if (g == 0 && h == 0) {
                        _mm_prefetch((const char *)(w + PK_AHEAD), _MM_HINT_T1);
                        _mm_prefetch((const char *)(w + PK_AHEAD + 16), _MM_HINT_T1);
                    }
                    __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
                    IN_REGISTER(w0);
                    IN_REGISTER(w1);
#pragma GCC unroll 6
                    for (int m = 0; m < group; m++) {
                        const __m256 xm = _mm256_broadcast_ss(xr[m] + k);
                        acc[2 * m] = _mm256_fmadd_ps(xm, w0, acc[2 * m]);
                        acc[2 * m + 1] = _mm256_fmadd_ps(xm, w1, acc[2 * m + 1]);
                    }
                }
#pragma GCC unroll 6
                for (int m = 0; m < group; m++) {
                    _mm256_storeu_ps(acc_out[g + m] + 16 * h, acc[2 * m]);
                    _mm256_storeu_ps(acc_out[g + m] + 16 * h + 8, acc[2 * m + 1]);
                }
            }
        }
    }
#else
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 32; j++) acc_out[m][j] = 0.0f;
    for (int64_t k = 0; k < k_len; k++) {
        const float *w = panel + 32 * k;
        for (int m = 0; m < rows; m++) {
            const float xm = x[m][k];
#pragma omp simd
            for (int j = 0; j < 32; j++) acc_out[m][j] += xm * w[j];
        }
    }
#endif
}

#define PANEL_CASE(n)                            \
    case n:                                      \
        panel_tile(x, n, panel, k_len, acc_out); \
        break;

static void panel_tiles(const float *const *x, int rows, const float *panel, int64_t k_len, float acc_out[PK_TOKENS][32]) {
    switch (rows) {
        PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) PANEL_CASE(6)
        PANEL_CASE(7) PANEL_CASE(8) PANEL_CASE(9) PANEL_CASE(10) PANEL_CASE(11) PANEL_CASE(12)
    }
}

/* What a panel's sums become. */
enum panel_out {
    PANEL_SWIGLU, /* dest row m, columns [16p, 16p + 16) = silu(gate) * up (an expert's stage 1) */
    PANEL_ADD,    /* dest row out_rows[m], columns [32p, 32p + 32) += weights[m] * sums (stage 2) */
    PANEL_STORE,  /* dest row m, columns [32p, 32p + 32) = sums (a dense projection) */
};

/* Rows times this thread's panels [lo, hi), each [k_len][32] at panels + p * 32 * k_len, for `count` rows.
   Input row m is in + in_row(m) * in_stride (in_row(m) = in_rows[m], or m where in_rows is NULL); the sums
   go to dest (row stride dest_stride) as `kind` says. */
static void panel_stage(const float *in, const int64_t *in_rows, int64_t in_stride, int64_t count, const float *panels,
                        int64_t k_len, int64_t lo, int64_t hi, float *dest, int64_t dest_stride, enum panel_out kind,
                        const int64_t *out_rows, const float *weights) {
    const float *rows[PK_TOKENS];
    float sums[PK_TOKENS][32];
    for (int64_t b0 = 0; b0 < count; b0 += ROW_BLOCK) {
        const int64_t block = block_end(b0, ROW_BLOCK, count) - b0, tiles = (block + PK_TOKENS - 1) / PK_TOKENS;
        for (int64_t p = lo; p < hi; p++)
            for (int64_t t = 0, first; t < tiles; t++) {
                const int n = tile_rows(block, tiles, t, &first);
                first += b0;
                for (int m = 0; m < n; m++) rows[m] = in + (in_rows ? in_rows[first + m] : first + m) * in_stride;
                panel_tiles(rows, n, panels + p * 32 * k_len, k_len, sums);
                for (int m = 0; m < n; m++) {
                    if (kind == PANEL_SWIGLU) {
                        float *h = dest + (first + m) * dest_stride + 16 * p;
#pragma omp simd
                        for (int i = 0; i < 16; i++) h[i] = sums[m][i] / (1.0f + expf(-sums[m][i])) * sums[m][16 + i];
                    } else if (kind == PANEL_ADD) {
                        float *o = dest + out_rows[first + m] * dest_stride + 32 * p;
                        const float g = weights[first + m];
#pragma omp simd
                        for (int i = 0; i < 32; i++) o[i] += g * sums[m][i];
                    } else {
                        memcpy(dest + (first + m) * dest_stride + 32 * p, sums[m], sizeof sums[m]);
                    }
                }
            }
    }
}

/* x [T, H]; topk_ids [T, k] (int64, -1 for a choice not taken), topk_weights [T, k]; wanted [E] or NULL
   for every expert; scratch [T * k, 2I]; out [T, H] (overwritten). The weights are w13 [E, 2I, H] and
   w2 [E, H, I] as the checkpoint has them, or with `packed` the panels p13 [E, I/16, H, 32] and
   p2 [E, H/32, I, 32] (H % 32 == 0, I % 16 == 0; see above).
   Returns 0, 1 when working memory could not be allocated, 2 when an expert id is out of range. */
int moemesh_moe_experts(const float *x, int64_t num_tokens, const int64_t *topk_ids, const float *topk_weights,
                         int64_t top_k, const uint8_t *wanted, int64_t num_experts, const float *w13, const float *w2,
                         int64_t hidden_size, int64_t inter, float *scratch, float *out, int packed, int num_threads) {
    const int64_t assignments = num_tokens * top_k;
    int64_t *token_of = malloc(sizeof(int64_t) * (size_t)(assignments + 3 * num_experts + 1));
    float *weight_of = malloc(sizeof(float) * (size_t)(assignments + 1));
    if (token_of == NULL || weight_of == NULL) {
        free(token_of), free(weight_of);
        return 1;
    }
    int64_t *counts = token_of + assignments, *next = counts + num_experts, *starts = next + num_experts + 1;
    const int failed = group_by_expert(topk_ids, topk_weights, num_tokens, top_k, num_experts, token_of, weight_of, counts, next);
    if (failed) {
        free(token_of), free(weight_of);
        return failed;
    }
    for (int64_t e = 0, first = 0; e < num_experts; first += counts[e], e++) starts[e] = first;
    memset(out, 0, sizeof(float) * (size_t)(num_tokens * hidden_size));
#define IDLE(e) (counts[e] == 0 || (wanted != NULL && !wanted[e])) /* no rows, or computed elsewhere */
    if (packed) {
        const int64_t panels = inter / 16, chunks = (panels + PK_ITEM_PANELS - 1) / PK_ITEM_PANELS;
#pragma omp parallel num_threads(num_threads)
        {
            /* Stage 1, items of (expert, PK_ITEM_PANELS panels); stage 2, items of one output panel for every
               expert (a column of out has one writer). Threads take items as they finish the last one. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < num_experts * chunks; item++) {
                const int64_t e = item / chunks, lo = (item % chunks) * PK_ITEM_PANELS;
                if (IDLE(e)) continue;
                panel_stage(x, token_of + starts[e], hidden_size, counts[e], w13 + e * 2 * inter * hidden_size, hidden_size,
                            lo, block_end(lo, PK_ITEM_PANELS, panels), scratch + starts[e] * inter, inter, PANEL_SWIGLU,
                            NULL, NULL);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t p = 0; p < hidden_size / 32; p++)
                for (int64_t e = 0; e < num_experts; e++)
                    if (!IDLE(e))
                        panel_stage(scratch + starts[e] * inter, NULL, inter, counts[e], w2 + e * hidden_size * inter, inter,
                                    p, p + 1, out, hidden_size, PANEL_ADD, token_of + starts[e], weight_of + starts[e]);
        }
    } else {
#pragma omp parallel num_threads(num_threads)
        {
            int64_t lo, hi;
            thread_range(inter, W_ROWS, &lo, &hi);
            for (int64_t e = 0; e < num_experts; e++)
                if (!IDLE(e))
                    gate_up(x, token_of + starts[e], counts[e], w13 + e * 2 * inter * hidden_size, hidden_size, inter, lo,
                            hi, scratch + starts[e] * 2 * inter);
#pragma omp barrier
            thread_range(hidden_size, W_ROWS, &lo, &hi);
            for (int64_t e = 0; e < num_experts; e++)
                if (!IDLE(e))
                    project(scratch + starts[e] * 2 * inter, NULL, 2 * inter, counts[e], w2 + e * hidden_size * inter,
                            inter, out, token_of + starts[e], hidden_size, weight_of + starts[e], lo, hi);
        }
    }
#undef IDLE
    free(token_of), free(weight_of);
    return failed;
}

/* out [rows, out_features] = x [rows, in_features] @ w [out_features, in_features]^T, the threads splitting the
   output columns: the experts' tiles for the dense projections of small decode batches. With `packed`, w is
   in panels [out_features / 32, in_features, 32] (panel p: output columns [32p, 32p + 32)) and goes through
   the broadcast tile, else through the dot-product tile. */
int moemesh_linear(const float *x, int64_t rows, const float *w, int64_t in_features, int64_t out_features, float *out,
                   int packed, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    {
        int64_t lo, hi;
        if (packed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t p = 0; p < out_features / 32; p++)
                panel_stage(x, NULL, in_features, rows, w, in_features, p, p + 1, out, out_features, PANEL_STORE, NULL, NULL);
        } else {
            thread_range(out_features, W_ROWS, &lo, &hi);
            project(x, NULL, in_features, rows, w, in_features, out, NULL, out_features, NULL, lo, hi);
        }
    }
    return 0;
}

/* The router of an MoE layer: for each token row r < rows, probs[r] = softmax(w @ x[r]) over the experts,
   then its top_k experts by probability (ties: the lower index first) into ids[r] and their probabilities
   into weights[r], rescaled to sum to 1 when `renormalize`. x [rows, hidden], w [experts, hidden],
   probs [rows, experts] (work space), ids [rows, top_k] (int64), weights [rows, top_k]. */
int moemesh_route(const float *x, int64_t rows, const float *w, int64_t experts, int64_t hidden, int64_t top_k,
                  int renormalize, float *probs, int64_t *ids, float *weights, int num_threads) {
    if (top_k < 1 || top_k > experts) return 2;
    /* A decode step's router is a few thousand multiply-adds per row: waking the other threads costs more. */
    const int threads = rows * experts * hidden >= (1 << 20) ? num_threads : 1;
#pragma omp parallel num_threads(threads)
    {
        int64_t lo, hi;
        thread_range(experts, W_ROWS, &lo, &hi);
        project(x, NULL, hidden, rows, w, hidden, probs, NULL, experts, NULL, lo, hi);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *p = probs + r * experts, top = p[0], sum = 0.0f;
            for (int64_t e = 1; e < experts; e++) top = p[e] > top ? p[e] : top;
            for (int64_t e = 0; e < experts; e++) sum += p[e] = expf(p[e] - top);
            for (int64_t e = 0; e < experts; e++) p[e] /= sum;
            int64_t *chosen = ids + r * top_k;
            float *chosen_weight = weights + r * top_k, picked = 0.0f;
            for (int64_t j = 0; j < top_k; j++) {
                int64_t best = -1;
                for (int64_t e = 0; e < experts; e++) {
                    int taken = 0;
                    for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
                    if (!taken && (best < 0 || p[e] > p[best])) best = e; /* a NaN never wins but is still a valid id */
                }
                chosen[j] = best, chosen_weight[j] = p[best], picked += p[best];
            }
            if (renormalize)
                for (int64_t j = 0; j < top_k; j++) chosen_weight[j] /= picked;
        }
    }
    return 0;
}

/* A layer's routing split by the rank that holds each chosen expert (expert parallelism: rank 0 sends each
   shard only its rows). topk_ids [T, k] (global expert ids), topk_weights [T, k], owner_of [E] (each expert's
   rank, -1: computed nowhere), wanted [E] or NULL (0: the choice is not computed at all). For each rank
   r < ranks, the tokens with a choice on r in token order: rows[r * T + i] (token index), and their choices
   on r in router order, padded to the rank's widest row with id -1 and weight 0, as a [n, width] block at
   ids[r * T * k] and weights[r * T * k]; counts[3 * r] = n, counts[3 * r + 1] = width, counts[3 * r + 2] =
   the choices in it. per_rank [ranks] is work space. Returns 0, or 2 when an expert id is out of range or an
   owner is at or above `ranks`. One pass to size each rank's block, one to fill it: a decode step's routing
   is a few hundred numbers, which numpy handled in tens of calls per rank. */
int moemesh_split_routing(const int64_t *topk_ids, const float *topk_weights, int64_t num_tokens, int64_t top_k,
                          const int64_t *owner_of, const uint8_t *wanted, int64_t num_experts, int64_t ranks,
                          int64_t *rows, int32_t *ids, float *weights, int64_t *counts, int64_t *per_rank) {
    for (int64_t r = 0; r < 3 * ranks; r++) counts[r] = 0;
    for (int64_t t = 0; t < num_tokens; t++) {
        for (int64_t r = 0; r < ranks; r++) per_rank[r] = 0;
        for (int64_t j = 0; j < top_k; j++) {
            const int64_t e = topk_ids[t * top_k + j];
            if (e < 0 || e >= num_experts) return 2;
            if (wanted != NULL && !wanted[e]) continue;
            const int64_t r = owner_of[e];
            if (r < 0) continue;
            if (r >= ranks) return 2;
            per_rank[r]++;
        }
        for (int64_t r = 0; r < ranks; r++) {
            if (per_rank[r] == 0) continue;
            counts[3 * r]++;
            counts[3 * r + 2] += per_rank[r];
            if (per_rank[r] > counts[3 * r + 1]) counts[3 * r + 1] = per_rank[r];
        }
    }
    for (int64_t r = 0; r < ranks; r++) per_rank[r] = 0; /* from here: rows filled so far */
    for (int64_t t = 0; t < num_tokens; t++) {
        for (int64_t j = 0; j < top_k; j++) {
            const int64_t e = topk_ids[t * top_k + j];
            if (wanted != NULL && !wanted[e]) continue;
            const int64_t r = owner_of[e];
            if (r < 0) continue;
            const int64_t width = counts[3 * r + 1], base = r * num_tokens * top_k;
            int64_t n = per_rank[r];
            if (n == 0 || rows[r * num_tokens + n - 1] != t) { /* the token's first choice on r: open its row */
                rows[r * num_tokens + n] = t;
                for (int64_t c = 0; c < width; c++) ids[base + n * width + c] = -1, weights[base + n * width + c] = 0.0f;
                per_rank[r] = ++n;
            }
            int32_t *row_ids = ids + base + (n - 1) * width;
            int64_t c = 0;
            while (row_ids[c] != -1) c++;
            row_ids[c] = (int32_t)e, weights[base + (n - 1) * width + c] = topk_weights[t * top_k + j];
        }
    }
    return 0;
}

/* A shard's choices as rows of the weights it holds (expert parallelism). ids [n, k] are global expert ids,
   each row's valid ones first and -1 after; rows_of [E] is the row of each held expert, -1 for the others. Writes
   out [n, k]: the row of each choice, -1 for padding. Returns 0, or 2 when the work is not for these weights: an
   id below -1 or at or above E, an expert not held, a row with no first choice, or a valid choice after a -1.
   One pass where numpy took about ten calls, each several times slower with the caches cold from a layer's
   other work. */
int moemesh_map_held(const int32_t *ids, int64_t n, int64_t k, const int64_t *rows_of, int64_t num_experts,
                     int64_t *out) {
    for (int64_t t = 0; t < n; t++) {
        int padded = 0;
        for (int64_t j = 0; j < k; j++) {
            const int64_t e = ids[t * k + j];
            if (e == -1) {
                if (j == 0) return 2;
                padded = 1, out[t * k + j] = -1;
                continue;
            }
            if (padded || e < 0 || e >= num_experts || rows_of[e] < 0) return 2;
            out[t * k + j] = rows_of[e];
        }
    }
    return 0;
}
