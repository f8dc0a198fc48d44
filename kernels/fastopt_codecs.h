/* fastopt's storage codecs in C: fastopt/storage/codecs.py, bit for bit (float32
 * arithmetic on uint32 bits), for the Cython stored drivers (kernels/_cy_storage.pxi
 * declares these functions).  bfloat16 rounding (nearest even, stochastic, split),
 * the stochastic-rounding hash, the Kahan store bracketed between the result's
 * bfloat16 neighbours, and the 8-bit signed (square-root) and unsigned (fourth-root)
 * block codes with their special values (NaN, +-Inf).  tests/test_cython_storage.py
 * and tests/test_storage.py check them against the Numba codecs. */
#ifndef FASTOPT_CODECS_H
#define FASTOPT_CODECS_H

#include <stdint.h>
#include <string.h>
#include <math.h>

#define FO_FLT_MAX 3.4028234663852886e38f
#define FO_K2 ((float)(1.0 / (126.0 * 126.0)))
#define FO_K4 ((float)(1.0 / (253.0 * 253.0 * 253.0 * 253.0)))

static inline uint32_t fo_bits32(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }
static inline float fo_float(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }
static inline float fo_widen(uint16_t u) { return fo_float((uint32_t)u << 16); }

static inline uint16_t fo_round_nearest(float x) {
    uint32_t b = fo_bits32(x), hi = b >> 16;
    if (x != x) return (uint16_t)(hi | 0x40u);
    return (uint16_t)((b + 0x7FFFu + (hi & 1u)) >> 16);
}
static inline uint16_t fo_round_stochastic(float x, uint32_t r) {
    uint32_t b = fo_bits32(x);
    if (x != x) return (uint16_t)((b >> 16) | 0x40u);
    return (uint16_t)((b + r) >> 16);
}
static inline uint16_t fo_split_high(float x) {
    uint32_t hi = fo_bits32(x) >> 16;
    if (x != x) hi |= 0x40u;
    return (uint16_t)hi;
}
static inline uint16_t fo_split_low(float x) { return (uint16_t)(fo_bits32(x) & 0xFFFFu); }
static inline float fo_join(uint16_t hi, uint16_t lo) {
    return fo_float(((uint32_t)hi << 16) | (uint32_t)lo);
}
static inline uint32_t fo_random16(uint32_t key, int64_t e) {
    uint64_t u = (uint64_t)e;
    uint32_t h = (uint32_t)u * 0x9E3779B1u + (uint32_t)(u >> 32) * 0x85EBCA77u + key;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h >> 16;
}
/* t held between the two bfloat16 neighbours of x (NaN passes through) */
static inline uint16_t fo_bracket(uint16_t t, float x) {
    uint32_t b = fo_bits32(x);
    uint32_t lo = b >> 16;
    uint32_t hi = lo + ((b & 0xFFFFu) != 0u ? 1u : 0u);
    float a = fo_widen((uint16_t)lo), c = fo_widen((uint16_t)hi), v = fo_widen(t);
    uint32_t down = a <= c ? lo : hi, up = a <= c ? hi : lo;
    float mn = a <= c ? a : c, mx = a <= c ? c : a;
    if (v < mn) t = (uint16_t)down;
    if (v > mx) t = (uint16_t)up;
    return t;
}
/* kahan store: old is the stored parameter (not yet written) */
static inline void fo_kahan(uint16_t* p, uint16_t* a, float x) {
    float old = fo_widen(*p);
    float u = x - old;
    float y = fo_widen(*a) + u;
    uint16_t t = fo_bracket(fo_round_nearest(old + y), x);
    *p = t;
    *a = fo_round_nearest(y - (fo_widen(t) - old));
}
static inline float fo_scale_inverse(float s) {
    float inv;
    if (!(s > 0.0f)) return FO_FLT_MAX;
    inv = 1.0f / s;
    if (inv > FO_FLT_MAX) inv = FO_FLT_MAX;
    return inv;
}
static inline float fo_magnitude(float x) {
    float a = fabsf(x);
    if (a > FO_FLT_MAX) return 0.0f;
    if (a != a) return 0.0f;
    return a;
}
static inline uint8_t fo_encode_signed(float x, float inv) {
    float y, q;
    int32_t k;
    if (x != x) return 128;
    if (x > FO_FLT_MAX) return 127;
    if (x < -FO_FLT_MAX) return 129;
    y = sqrtf(fabsf(x) * inv) * 126.0f;
    q = floorf(y + 0.5f);
    if (q > 126.0f) q = 126.0f;
    k = (int32_t)q;
    if (x < 0) k = (256 - k) & 255;
    return (uint8_t)k;
}
static inline float fo_decode_signed(uint8_t c, float s) {
    int32_t k;
    float w;
    if (c == 128) return fo_float(0x7FC00000u);
    if (c == 127) return fo_float(0x7F800000u);
    if (c == 129) return fo_float(0xFF800000u);
    k = (int32_t)c;
    if (k >= 128) k -= 256;
    w = (float)k;
    return (w * fabsf(w)) * FO_K2 * s;
}
static inline uint8_t fo_encode_unsigned(float x, float inv) {
    float y, q;
    if (x != x) return 255;
    if (x > FO_FLT_MAX) return 254;
    if (!(x > 0)) return 0;
    y = sqrtf(sqrtf(x * inv)) * 253.0f;
    q = floorf(y + 0.5f);
    if (q < 1.0f) q = 1.0f;      /* a positive value never rounds to 0 */
    if (q > 253.0f) q = 253.0f;
    return (uint8_t)(int32_t)q;
}
static inline float fo_decode_unsigned(uint8_t c, float s) {
    float w, w2;
    if (c == 255) return fo_float(0x7FC00000u);
    if (c == 254) return fo_float(0x7F800000u);
    w = (float)c;
    w2 = w * w;
    return (w2 * w2) * FO_K4 * s;
}

#endif  /* FASTOPT_CODECS_H */
