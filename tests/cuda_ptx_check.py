"""Compile every kernel of the CUDA backend to PTX, without a GPU.

Run by ``tests/test_cuda_backend.py`` in a process *without* the CUDA simulator: the
simulator runs kernels as Python and cannot see what the CUDA compiler rejects (for
example NumPy scalar functions that numba-cuda does not lower, or an index that
types as a float).  Needs NVVM (``pip install 'numba-cuda[cu13]'`` or a CUDA toolkit
with ``CUDA_HOME`` set); no GPU or driver.

Compiles, for every rule x registry variant x dtype, the kernel the backend uses
(dense multi-tensor kernel for element-wise rules, plus their row-sparse kernel;
the row-wise kernel for row-wise rules), and checks that the PTX has no
approximate square root or division and that the dense kernel loads through the
pointer table.

Exit status: 0 compiled, 1 a kernel failed to compile, 3 cannot check here (the last
line says why).
"""

import sys
import types as pytypes


def main():
    try:
        from numba import cuda
        from numba.cuda import types
        import numba.cuda.dispatcher as dispatcher
        dispatcher.get_current_device   # compiling device functions asks for its compute capability
    except (ImportError, AttributeError) as exc:
        print(f"numba-cuda is missing or its internals changed; cannot fake a device: {exc}")
        return 3
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))

    def probe(x):
        x[0] = 1.0

    try:
        cuda.compile_ptx(probe, (types.float32[::1],), cc=(9, 0))
    except Exception as exc:  # noqa: BLE001 (library not found, in its several forms)
        msg = " ".join(str(exc).split())
        print(f"the CUDA compiler libraries (NVVM, NVRTC) are not available here: {msg:.200}")
        return 3

    import numpy as np
    from fastopt import _cuda_backend as cb
    from fastopt import benchmark, registry

    i64 = types.int64
    tab = types.Array(i64, 2, "C")
    idx = types.Array(i64, 1, "C")
    hyper = types.Array(types.float64, 2, "C")
    fty = {np.float32: types.float32, np.float64: types.float64}

    def check(ptx, what):
        assert "sqrt.approx" not in ptx and "div.approx" not in ptx \
            and "div.full" not in ptx, what

    def dense(math_fn, dt, uses, const):
        k = cb.make_dense_kernel(math_fn, dt, uses, const)
        ptx, _ = cuda.compile_ptx(k.py_func, (tab, tab, hyper), cc=(9, 0))
        return ptx

    def rows(math_fn, dt, uses, const):
        k = cb.make_rows_kernel(math_fn, dt, uses, const)
        a2 = types.Array(fty[dt], 2, "C")
        ptx, _ = cuda.compile_ptx(k.py_func, (a2,) * 5 + (idx,) * 3 + (i64, types.boolean,
                                                                       hyper), cc=(9, 0))
        return ptx

    def rowwise(math_fn, dt, uses, const):
        k = cb.make_rowwise_kernel(math_fn, dt, uses, const)
        a2 = types.Array(fty[dt], 2, "C")
        ptx, _ = cuda.compile_ptx(k.py_func, (a2,) * 3 + (idx,) * 3 + (i64, types.boolean, a2,
                                                                       hyper), cc=(9, 0))
        return ptx

    n = 0
    for name, rule in registry.RULES.items():
        for variant in rule.variants:
            group = rule.check_group({**rule.defaults, **variant})
            uses, const = rule.uses_slots(group), rule.constants(group)
            for dt in (np.float32, np.float64):
                what = (name, variant, np.dtype(dt).name)
                try:
                    if rule.layout == "rowwise":
                        check(rowwise(rule.math, dt, uses, const), what)
                        n += 1
                    else:
                        ptx = dense(rule.math, dt, uses, const)
                        check(ptx, what)
                        assert "ld.param" in ptx and ("ld.f" in ptx or "ld.global" in ptx), what
                        check(rows(rule.math, dt, uses, const), what)
                        n += 2
                except Exception as exc:   # noqa: BLE001 (report which kernel, then fail)
                    print(f"FAILED to compile {what}: {type(exc).__name__}: {exc}")
                    return 1
    dense(benchmark.touch, np.float32, (True, True, True), ())
    print(f"compiled {n} rule kernels and the ceiling kernel to PTX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
