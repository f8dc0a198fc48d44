"""The 8-bit codec and the stochastic store alone: ns per element and whether LLVM
made each loop SIMD (docs/low-precision.md, "Where the 8-bit step's time goes").

    python bench/codec_stages.py [--n 262144] [--reps 300]

Each stage is a Numba loop over 256-element blocks (views indexed from 0, as the
drivers run them) of an in-cache array, one thread; timings are the minimum and
median of ``reps`` interleaved calls (the minimum is the one to read on a shared
machine).  For every loop the count of ``zmm``/``ymm`` instructions and of the
scalar square roots in ``dispatcher.inspect_asm()`` is printed: vector registers
in the loop body mean it vectorized (the scalar ones are the remainder loops).
"""

import argparse
import re
import time

import numpy as np
from numba import njit
from numba.extending import register_jitable

from fastopt.storage import codecs as C

F32, U = np.float32, np.uint32


@register_jitable(inline="always")
def _enc_s(T, x, a, m):
    for i in range(m):
        T[i] = C.encode_signed_finite(x[i], a)


@register_jitable(inline="always")
def _enc_u(T, x, a, m):
    for i in range(m):
        T[i] = C.encode_unsigned_finite(abs(x[i]), a)


@register_jitable(inline="always")
def _dec_s(T, x, a, m):
    for i in range(m):
        x[i] = C.decode_signed_finite(T[i], a)


@register_jitable(inline="always")
def _dec_u(T, x, a, m):
    for i in range(m):
        x[i] = C.decode_unsigned_finite(T[i], a)


@register_jitable(inline="always")
def _enc_linear(T, x, a, m):
    for i in range(m):
        T[i] = np.uint8(np.int32(np.floor(x[i] * a * F32(127.0) + F32(0.5))) & np.int32(255))


def _blocks(body):
    @njit(error_model="numpy")
    def run(T, x, a, P, key):
        for kb in range(x.shape[0] // 256):
            lo = kb * 256
            body(T[lo:lo + 256], x[lo:lo + 256], a, 256)
    return run


def _bf16_stores(rounded):
    """A loop storing bfloat16 bits ``rounded(x, key, lo, i)`` of element ``lo + i``,
    block by block, as the drivers store parameters."""
    @njit(error_model="numpy")
    def run(T, x, a, P, key):
        for kb in range(x.shape[0] // 256):
            lo = kb * 256
            Pb, xb = P[lo:lo + 256], x[lo:lo + 256]
            for i in range(256):
                Pb[i] = rounded(xb[i], key, lo, i)
    return run


@register_jitable(inline="always")
def _sr_element(x, key, lo, i):
    return C.round_stochastic(x, C.random16(key, lo + i))


@register_jitable(inline="always")
def _sr_block(x, key, lo, i):
    return C.round_stochastic(x, C.random16_at(key, lo, i))


@register_jitable(inline="always")
def _nearest(x, key, lo, i):
    return C.round_nearest(x)


STAGES = {
    "encode signed (sqrt code)": _blocks(_enc_s),
    "encode unsigned (fourth-root code)": _blocks(_enc_u),
    "decode signed": _blocks(_dec_s),
    "decode unsigned": _blocks(_dec_u),
    "encode linear (for comparison)": _blocks(_enc_linear),
    "bf16 store, stochastic, random16(key, e)": _bf16_stores(_sr_element),
    "bf16 store, stochastic, random16_at(key, e0, i)": _bf16_stores(_sr_block),
    "bf16 store, round to nearest": _bf16_stores(_nearest),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args(argv)
    n = args.n - args.n % 256
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(F32)
    T = rng.integers(0, 127, n).astype(np.uint8)
    P = np.zeros(n, np.uint16)
    a = F32(0.3)
    key = U(12345)
    for f in STAGES.values():
        f(T, x.copy(), a, P, key)
    times = {k: [] for k in STAGES}
    for _ in range(args.reps):
        for k, f in STAGES.items():
            xs = x if "decode" not in k else x.copy()
            t0 = time.perf_counter()
            f(T, xs, a, P, key)
            times[k].append(time.perf_counter() - t0)
    print("| stage | min ns/elem | median ns/elem | zmm | ymm | scalar sqrt |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, f in STAGES.items():
        asm = f.inspect_asm(f.signatures[0])
        ops = re.findall(r"\t(v[a-z0-9]+)\t([^\n]*)", asm)
        z = sum("zmm" in o for _, o in ops)
        y = sum("ymm" in o for _, o in ops)
        s = sum(name == "vsqrtss" for name, _ in ops)
        t = np.array(times[k]) / n * 1e9
        print(f"| {k} | {t.min():.3f} | {np.median(t):.3f} | {z} | {y} | {s} |")


if __name__ == "__main__":
    main()
