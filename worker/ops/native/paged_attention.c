/* Decode attention that reads the paged KV cache in place (CPU, float32).
 *
 * A decode step has one new query token per sequence. The portable path
 * gathers every sequence's key and value blocks into a dense copy and then
 * runs scaled-dot-product attention on it: the cache is read, written and
 * read again. This kernel follows each sequence's block table and reads
 * every key and value once, straight from the block pool.
 *
 * Layouts (all contiguous, row-major):
 *   q, out        [B, num_heads, head_dim]
 *   k_cache,
 *   v_cache       [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables  [B, max_blocks]     (int64; entries past a sequence's end are ignored)
 *   seq_lens      [B]                 (int64; keys [0, seq_len) exist, the query sits at seq_len - 1)
 * window > 0 limits each query to its last `window` keys (sliding window).
 * Query head h reads key/value head h / (num_heads / num_kv_heads), as
 * grouped-query attention does.
 *
 * Work items are sequences (or, with fewer sequences than threads, (sequence,
 * kv head) pairs), spread over OpenMP threads. The
 * library is built against the OpenMP runtime that PyTorch has already
 * loaded, so both share one thread pool (see moemesh/worker/native).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* The keys (or values) of one sequence, read block by block: each block's rows are contiguous in memory. */
typedef struct {
    const float *pool;     /* [num_blocks, block_size, num_kv_heads, head_dim] */
    const int64_t *table;  /* the sequence's block ids */
    int64_t block_size, row; /* row = num_kv_heads * head_dim floats per position */
} Pages;

static inline const float *position_row(const Pages *pages, int64_t t) {
    return pages->pool + (pages->table[t / pages->block_size] * pages->block_size + t % pages->block_size) * pages->row;
}

/* The end of the run of positions from t that share t's block (one contiguous stretch of rows), capped at len. */
static inline int64_t block_run_end(const Pages *pages, int64_t t, int64_t len) {
    const int64_t block_end = t - t % pages->block_size + pages->block_size;
    return block_end < len ? block_end : len;
}

/* Ask for the lines of floats [from, to) of position t's row, into L2. */
static inline void prefetch_row(const Pages *pages, int64_t t, int64_t from, int64_t to) {
    const char *row = (const char *)position_row(pages, t);
    for (int64_t i = from * 4; i < to * 4; i += 64) __builtin_prefetch(row + i, 0, 2);
}

/* How many blocks ahead of the one being read the stream is requested. */
#define PREFETCH_BLOCKS 2

/* The same for row t + PREFETCH_BLOCKS * block_size, the same row of a block further on, while row t is
   being read: a block is one contiguous run, and the runs are scattered over the pool, so the hardware
   prefetcher loses the stream at every block boundary. Two blocks rather than one: when neighbours load
   the memory system, one block's lead was not always enough (native decode attention 4.3 -> 3.7 ms in
   such a spell, equal otherwise). */
static inline void prefetch_next_block(const Pages *pages, int64_t t, int64_t len, int64_t from, int64_t to) {
    if (t + PREFETCH_BLOCKS * pages->block_size < len) prefetch_row(pages, t + PREFETCH_BLOCKS * pages->block_size, from, to);
}

/* The rows of the first PREFETCH_BLOCKS blocks from `start`, which nothing earlier asked for. */
static inline void prefetch_first_blocks(const Pages *pages, int64_t start, int64_t len, int64_t from, int64_t to) {
    const int64_t end = start - start % pages->block_size + PREFETCH_BLOCKS * pages->block_size;
    for (int64_t t = start; t < len && t < end; t++) prefetch_row(pages, t, from, to);
}

/* Scores of query heads [h0, h1) against keys [start, len): scores[h * span + i], each row's maximum in maxima[h]. */
static void head_scores(const float *q, const Pages *keys, int64_t start, int64_t len, int64_t h0, int64_t h1, int64_t group,
                        int64_t head_dim, float scale, float *scores, float *maxima) {
    const int64_t span = len - start;
    for (int64_t h = h0; h < h1; h++) maxima[h] = -INFINITY;
    for (int64_t t = start; t < len;) {
        const int64_t run_end = block_run_end(keys, t, len);
        const float *row = position_row(keys, t);
        for (; t < run_end; t++, row += keys->row) {
            prefetch_next_block(keys, t, len, (h0 / group) * head_dim, ((h1 - 1) / group + 1) * head_dim);
            for (int64_t h = h0; h < h1; h++) {
                const float *qh = q + h * head_dim, *key = row + (h / group) * head_dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * key[d];
                dot *= scale;
                scores[h * span + (t - start)] = dot;
                maxima[h] = dot > maxima[h] ? dot : maxima[h];
            }
        }
    }
}

/* Softmax of heads [h0, h1) in place; each head's 1 / (sum of exponentials) in inv_sums[h]. */
static void head_softmax(float *scores, const float *maxima, int64_t h0, int64_t h1, int64_t span, float *inv_sums) {
    for (int64_t h = h0; h < h1; h++) {
        float *row = scores + h * span;
        const float top = maxima[h];
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < span; i++) {
            row[i] = expf(row[i] - top);
            sum += row[i];
        }
        inv_sums[h] = 1.0f / sum;
    }
}

/* out[h] = sum_i p[h][i] * value(start + i) * inv_sums[h], for query heads [h0, h1). */
static void head_values(const float *scores, const float *inv_sums, const Pages *values, int64_t start, int64_t len, int64_t h0,
                        int64_t h1, int64_t group, int64_t head_dim, float *out) {
    const int64_t span = len - start;
    for (int64_t i = h0 * head_dim; i < h1 * head_dim; i++) out[i] = 0.0f;
    for (int64_t t = start; t < len;) {
        const int64_t run_end = block_run_end(values, t, len);
        const float *row = position_row(values, t);
        for (; t < run_end; t++, row += values->row) {
            prefetch_next_block(values, t, len, (h0 / group) * head_dim, ((h1 - 1) / group + 1) * head_dim);
            for (int64_t h = h0; h < h1; h++) {
                const float p = scores[h * span + (t - start)], *value = row + (h / group) * head_dim;
                float *oh = out + h * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) oh[d] += p * value[d];
            }
        }
    }
    for (int64_t h = h0; h < h1; h++)
        for (int64_t d = 0; d < head_dim; d++) out[h * head_dim + d] *= inv_sums[h];
}

#if defined(__AVX512F__)
#define MAX_CHUNKS 8 /* the vector path takes head_dim = 16 * chunks up to 128 */

/* head_scores for head_dim % 16 == 0: sixteen positions at a time, their dot products summed with one
   shuffle tree (the per-key horizontal sums dominated the plain loop). */
static void head_scores_16(const float *q, const Pages *keys, const Pages *values, int64_t start, int64_t len, int64_t h0,
                           int64_t h1, int64_t group, int64_t head_dim, float scale, float *scores, float *maxima) {
    const int64_t span = len - start, chunks = head_dim / 16;
    const int64_t kv_from = (h0 / group) * head_dim, kv_to = ((h1 - 1) / group + 1) * head_dim;
    for (int64_t h = h0; h < h1; h++) maxima[h] = -INFINITY;
    for (int64_t t0 = start; t0 < len; t0 += 16) {
        const int n = len - t0 < 16 ? (int)(len - t0) : 16;
        const __mmask16 valid = (__mmask16)((1u << n) - 1);
        const float *rows[16];
        for (int p = 0; p < 16; p++) rows[p] = position_row(keys, t0 + (p < n ? p : n - 1)); /* past the end: masked */
        const int64_t per_head = (n + (h1 - h0) - 1) / (h1 - h0);
        for (int64_t h = h0; h < h1; h++) {
            /* a share of the next block's keys and of these positions' values (read next), spread over the heads */
            for (int64_t p = (h - h0) * per_head; p < n && p < (h - h0 + 1) * per_head; p++) {
                prefetch_next_block(keys, t0 + p, len, kv_from, kv_to);
                prefetch_row(values, t0 + p, kv_from, kv_to);
            }
            const float *qh = q + h * head_dim;
            const int64_t offset = (h / group) * head_dim;
            __m512 acc[16];
#pragma GCC unroll 16
            for (int p = 0; p < 16; p++) acc[p] = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) {
                __m512 qc = _mm512_loadu_ps(qh + 16 * c);
                IN_REGISTER(qc);
#pragma GCC unroll 16
                for (int p = 0; p < 16; p++) acc[p] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[p] + offset + 16 * c), qc, acc[p]);
            }
            const __m512 dots = _mm512_mul_ps(hsum16_ordered(acc), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + h * span + (t0 - start), valid, dots);
            const float top = _mm512_mask_reduce_max_ps(valid, dots);
            maxima[h] = top > maxima[h] ? top : maxima[h];
        }
    }
}

/* head_values for head_dim % 16 == 0, head_dim <= 16 * MAX_CHUNKS: each head's output stays in registers
   while its positions stream past (the plain loop went through memory for every position). */
static void head_values_16(const float *scores, const float *inv_sums, const Pages *values, int64_t start, int64_t len,
                           int64_t h0, int64_t h1, int64_t group, int64_t head_dim, float *out) {
    const int64_t span = len - start, chunks = head_dim / 16;
    for (int64_t h = h0; h < h1; h++) {
        const float *p = scores + h * span - start;
        const int64_t offset = (h / group) * head_dim;
        __m512 acc[MAX_CHUNKS];
#pragma GCC unroll 8
        for (int c = 0; c < MAX_CHUNKS; c++) acc[c] = _mm512_setzero_ps();
        for (int64_t t = start; t < len;) {
            const int64_t run_end = block_run_end(values, t, len);
            const float *row = position_row(values, t) + offset;
            for (; t < run_end; t++, row += values->row) {
                const __m512 weight = _mm512_set1_ps(p[t]);
#pragma GCC unroll 8
                for (int c = 0; c < MAX_CHUNKS; c++)
                    if (c < chunks) acc[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(row + 16 * c), acc[c]);
            }
        }
        const __m512 inv = _mm512_set1_ps(inv_sums[h]);
        for (int c = 0; c < MAX_CHUNKS && c < chunks; c++) _mm512_storeu_ps(out + h * head_dim + 16 * c, _mm512_mul_ps(acc[c], inv));
    }
}
#endif

/* Whether every sequence's keys lie in blocks its table names, and every block it reads exists. */
static int tables_valid(const int64_t *block_tables, const int64_t *seq_lens, int64_t num_seqs, int64_t max_blocks,
                        int64_t block_size, int64_t num_blocks) {
    for (int64_t b = 0; b < num_seqs; b++) {
        if (seq_lens[b] < 0 || seq_lens[b] > max_blocks * block_size) return 0;
        for (int64_t i = 0; i * block_size < seq_lens[b]; i++) {
            const int64_t block = block_tables[b * max_blocks + i];
            if (block < 0 || block >= num_blocks) return 0;
        }
    }
    return 1;
}

/* Returns 0 on success, 1 when scratch memory could not be allocated, 2 when a table or length is out of range. */
int moemesh_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *block_tables,
                                   const int64_t *seq_lens, float *out, int64_t num_seqs, int64_t num_heads,
                                   int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                   int64_t num_blocks, int64_t window, float scale, int num_threads) {
    if (!tables_valid(block_tables, seq_lens, num_seqs, max_blocks, block_size, num_blocks)) return 2;
    const int64_t group = num_heads / num_kv_heads;
    int64_t longest = 1;
    for (int64_t b = 0; b < num_seqs; b++)
        if (seq_lens[b] > longest) longest = seq_lens[b];
    /* One work item per sequence, whose blocks are then read front to back; with fewer sequences than
       threads, one per (sequence, kv head) so that every thread has work. */
    const int64_t splits = num_seqs >= num_threads ? 1 : num_kv_heads, heads_per_item = num_heads / splits;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(num_heads * longest + 2 * num_heads));
        float *maxima = scores + num_heads * longest, *inv_sums = maxima + num_heads;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_seqs * splits; item++) {
            if (scores == NULL) { /* every thread must reach the loop; this one's items are reported as failed */
                failed = 1;
                continue;
            }
            const int64_t b = item / splits, h0 = (item % splits) * heads_per_item, h1 = h0 + heads_per_item;
            const int64_t len = seq_lens[b], start = (window > 0 && len > window) ? len - window : 0;
            const float *qb = q + b * num_heads * head_dim;
            float *ob = out + b * num_heads * head_dim;
            if (len <= 0) { /* no keys: nothing to attend to */
                for (int64_t i = h0 * head_dim; i < h1 * head_dim; i++) ob[i] = 0.0f;
                continue;
            }
            const Pages keys = {k_cache, block_tables + b * max_blocks, block_size, num_kv_heads * head_dim};
            const Pages values = {v_cache, keys.table, block_size, keys.row};
            prefetch_first_blocks(&keys, start, len, (h0 / group) * head_dim, ((h1 - 1) / group + 1) * head_dim);
#if defined(__AVX512F__)
            if (head_dim % 16 == 0 && head_dim <= 16 * MAX_CHUNKS) {
                head_scores_16(qb, &keys, &values, start, len, h0, h1, group, head_dim, scale, scores, maxima);
                head_softmax(scores, maxima, h0, h1, len - start, inv_sums);
                head_values_16(scores, inv_sums, &values, start, len, h0, h1, group, head_dim, ob);
                continue;
            }
#endif
            head_scores(qb, &keys, start, len, h0, h1, group, head_dim, scale, scores, maxima);
            head_softmax(scores, maxima, h0, h1, len - start, inv_sums);
            head_values(scores, inv_sums, &values, start, len, h0, h1, group, head_dim, ob);
        }
        free(scores);
    }
    return failed;
}
