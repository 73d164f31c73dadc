/* The small operations of a decoder layer (CPU, float32): RMSNorm, optionally after the residual add, and
 * rotary embedding fused with the KV cache write.
 *
 * In a decode step each of these touches a few kilobytes, and as PyTorch
 * operators they cost far more in dispatch and thread hand-offs than in
 * arithmetic: an RMSNorm is eight operators, a rotary embedding of queries
 * and keys with its cache write about thirty, per layer. With the router
 * (moe_experts.c), a 32-sequence decode step of the bench model spends
 * 1.4 ms in them as operators against 0.6 ms here (bench/native_bench.py);
 * inside the model step, with cold caches, the operators took about 2.4 ms
 * of 25. Each is one call that reads its inputs once. Small batches run on
 * the calling thread; prefill-sized ones split their rows over the OpenMP
 * threads.
 *
 * The arithmetic follows the PyTorch reference operation by operation
 * (moemesh/worker/models/layers.py), up to rounding: the sum of squares is
 * added in another order, and the compiler may fuse a multiply and an add.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Below this many floats in all, the rows run on the calling thread: waking the pool costs more. */
#define PARALLEL_FLOATS (1 << 16)

/* out[r] = weight * (s[r] / sqrt(mean(s[r]^2) + eps)) for rows r < rows of `dim` floats, where s = x, or
   s = x + residual when residual is given; s is then also written to summed (the new residual stream).
   x, residual, summed and out are [rows, dim] and contiguous; summed may be x or residual. */
int moemesh_rms_norm(const float *x, const float *residual, float *summed, const float *weight, float *out, int64_t rows,
                     int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= PARALLEL_FLOATS) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *source = x + r * dim;
        if (residual != NULL) {
            float *sum_row = summed + r * dim;
            const float *res_row = residual + r * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) sum_row[i] = source[i] + res_row[i];
            source = sum_row;
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < dim; i++) squares += source[i] * source[i];
        const float inv = 1.0f / sqrtf(squares / (float)dim + eps);
        float *out_row = out + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) out_row[i] = weight[i] * (source[i] * inv);
    }
    return 0;
}

/* out = x * cos + rotate_half(x) * sin over one head of dim 2 * half, where rotate_half(x) = (-x2, x1). */
static inline void rotate(const float *x, const float *cos, const float *sin, int64_t half, float *out) {
#pragma omp simd
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] - x[half + i] * sin[i];
#pragma omp simd
    for (int64_t i = 0; i < half; i++) out[half + i] = x[half + i] * cos[half + i] + x[i] * sin[half + i];
}

/* For each token row r < rows: q_out[r] = rotary(q[r]); the key cache row slots[r] = rotary(k[r]) and the
   value cache row slots[r] = v[r]. q, k and v hold their heads contiguously ([heads, head_dim]) and step
   q_stride, k_stride, v_stride floats from one token to the next (views into a fused qkv output). cos and
   sin are [rows, head_dim]; q_out is [rows, q_heads, head_dim]; each cache is [num_slots, kv_heads, head_dim].
   Returns 0, or 2 (nothing written) when a slot is out of range. */
int moemesh_rotary_store(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                         int64_t v_stride, const float *cos, const float *sin, const int64_t *slots, int64_t rows,
                         int64_t q_heads, int64_t kv_heads, int64_t head_dim, float *q_out, float *k_cache, float *v_cache,
                         int64_t num_slots, int num_threads) {
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= num_slots) return 2;
    const int64_t half = head_dim / 2, kv_row = kv_heads * head_dim;
#pragma omp parallel for num_threads(num_threads) if (rows * (q_heads + 2 * kv_heads) * head_dim >= PARALLEL_FLOATS) \
    schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int64_t h = 0; h < q_heads; h++) rotate(q + r * q_stride + h * head_dim, c, s, half, q_out + (r * q_heads + h) * head_dim);
        for (int64_t h = 0; h < kv_heads; h++)
            rotate(k + r * k_stride + h * head_dim, c, s, half, k_cache + slots[r] * kv_row + h * head_dim);
        memcpy(v_cache + slots[r] * kv_row, v + r * v_stride, sizeof(float) * (size_t)kv_row);
    }
    return 0;
}
