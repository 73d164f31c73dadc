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

/* Scores of query heads [h0, h1) against keys [start, len): scores[h * span + i], each row's maximum in maxima[h]. */
static void head_scores(const float *q, const Pages *keys, int64_t start, int64_t len, int64_t h0, int64_t h1, int64_t group,
                        int64_t head_dim, float scale, float *scores, float *maxima) {
    const int64_t span = len - start;
    for (int64_t h = h0; h < h1; h++) maxima[h] = -INFINITY;
    for (int64_t t = start; t < len;) {
        const int64_t run_end = block_run_end(keys, t, len);
        const float *row = position_row(keys, t);
        for (; t < run_end; t++, row += keys->row) {
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
            head_scores(qb, &keys, start, len, h0, h1, group, head_dim, scale, scores, maxima);
            head_softmax(scores, maxima, h0, h1, len - start, inv_sums);
            head_values(scores, inv_sums, &values, start, len, h0, h1, group, head_dim, ob);
        }
        free(scores);
    }
    return failed;
}
