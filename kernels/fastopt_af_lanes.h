/* The 8-lane float64 sums of squares of Adafactor's passes (kernels/_cy_factored.pxi),
 * the twin of fastopt/backends/numba_factored.py's _sq_lanes: acc[q] += x[8 i + q]^2
 * (widened to double first) for i = 0 .. nvec-1 in order, each lane the same chain of
 * IEEE operations as the scalar loop it replaces (the extension is built with
 * -ffp-contract=off: nothing is contracted or reassociated), so the bits are the
 * same.  GCC on x86-64 builds an AVX2 clone beside the baseline one and picks it at
 * load time (target_clones), as the extension itself is built for baseline x86-64. */
#ifndef FASTOPT_AF_LANES_H
#define FASTOPT_AF_LANES_H
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTOPT_AF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTOPT_AF_CLONES
#endif

FASTOPT_AF_CLONES
static void fastopt_af_lanes_f32(const float* x, ptrdiff_t nvec, double* acc)
{
    double a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    double a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
    for (ptrdiff_t i = 0; i < nvec; i++) {
        const float* p = x + 8 * i;
        double v0 = (double)p[0], v1 = (double)p[1], v2 = (double)p[2], v3 = (double)p[3];
        double v4 = (double)p[4], v5 = (double)p[5], v6 = (double)p[6], v7 = (double)p[7];
        a0 = a0 + v0 * v0; a1 = a1 + v1 * v1; a2 = a2 + v2 * v2; a3 = a3 + v3 * v3;
        a4 = a4 + v4 * v4; a5 = a5 + v5 * v5; a6 = a6 + v6 * v6; a7 = a7 + v7 * v7;
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
    acc[4] = a4; acc[5] = a5; acc[6] = a6; acc[7] = a7;
}

FASTOPT_AF_CLONES
static void fastopt_af_lanes_f64(const double* x, ptrdiff_t nvec, double* acc)
{
    double a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    double a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
    for (ptrdiff_t i = 0; i < nvec; i++) {
        const double* p = x + 8 * i;
        a0 = a0 + p[0] * p[0]; a1 = a1 + p[1] * p[1]; a2 = a2 + p[2] * p[2];
        a3 = a3 + p[3] * p[3]; a4 = a4 + p[4] * p[4]; a5 = a5 + p[5] * p[5];
        a6 = a6 + p[6] * p[6]; a7 = a7 + p[7] * p[7];
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
    acc[4] = a4; acc[5] = a5; acc[6] = a6; acc[7] = a7;
}
#endif
