/* Shared vector helpers of the native kernels (AVX-512 builds; IN_REGISTER for AVX2 builds too). */
#ifndef MOEMESH_SIMD_H
#define MOEMESH_SIMD_H
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

/* Keep a vector in a register: without this the compiler folds the load into every FMA that uses it,
   which spends a load slot per FMA and makes a loop load-bound. */
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* Lane j of the result is the sum of the lanes of v[j], for j < 8: a transposing tree of horizontal adds. */
static inline __attribute__((always_inline)) __m256 hsum8(const __m256 v[8]) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3); /* per 128-bit half: v0..v3, v4..v7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

#if defined(__AVX512F__)

/* Lane 4 * (j % 4) + j / 4 of the result is the sum of the lanes of v[j], for j < 16: a transposing
   shuffle tree, 15 adds and 30 shuffles for all sixteen, against about 8 dependent steps per horizontal
   sum one by one. SUM_LANE(j) names the lane; hsum16_ordered puts sum j in lane j. */
static inline __attribute__((always_inline)) __m512 hsum16(const __m512 v[16]) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++) /* halves: t[i] = (v[2i] lo + hi, v[2i+1] lo + hi) */
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* quarters: quarter q of u[i] holds four partial sums of v[4i + q] */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* pairs of lanes within each quarter */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(u[2 * i], u[2 * i + 1]), _mm512_unpackhi_ps(u[2 * i], u[2 * i + 1]));
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x44), _mm512_shuffle_ps(w[0], w[1], 0xEE));
}
#define SUM_LANE(j) (4 * ((j) % 4) + (j) / 4)

static inline __attribute__((always_inline)) __m512 hsum16_ordered(const __m512 v[16]) {
    const __m512i order = _mm512_setr_epi32(SUM_LANE(0), SUM_LANE(1), SUM_LANE(2), SUM_LANE(3), SUM_LANE(4), SUM_LANE(5),
                                            SUM_LANE(6), SUM_LANE(7), SUM_LANE(8), SUM_LANE(9), SUM_LANE(10),
                                            SUM_LANE(11), SUM_LANE(12), SUM_LANE(13), SUM_LANE(14), SUM_LANE(15));
    return _mm512_permutexvar_ps(order, hsum16(v));
}
#endif
#endif
