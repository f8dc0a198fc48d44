"""Compile every kernel of the CUDA backend to PTX, without a GPU.

Run by ``tests/test_cuda_backend.py`` in a process *without* the CUDA simulator: the
simulator runs kernels as Python and cannot see what the CUDA compiler rejects (for
example NumPy scalar functions that numba-cuda does not lower, an index that types
as a float, or a device function returning an array view).  Needs NVVM
(``pip install 'numba-cuda[cu13]'`` or a CUDA toolkit with ``CUDA_HOME`` set); no GPU
or driver.

Compiles, with the argument types the backend launches them with:

* for every rule x registry variant x dtype, the configuration the planner makes
  (:func:`fastopt.planner.group_spec` / :func:`~fastopt.planner.config`): the dense
  multi-tensor kernel and the rows kernel of element-wise rules, the row-wise
  kernel of row-wise rules;
* for every rule and dtype, every fused option on at once, with ``grad_scale``:
  dense (without ``max_norm``, which runs through the rows kernels), rows and the
  ``max_norm`` renorm kernel, or the row-wise kernel;
* for every exact-mode configuration (``Rule.exact_refusal`` None) and
  dtype: the rows kernel with the catch-up, stepping and flush-only;
* the ``skip_nonfinite`` counting kernel for both dtypes, and the benchmark's
  no-math ceiling kernel;
* the factored passes of Adafactor and the matrix phase of Muon (element phase 1
  per variant, the Newton-Schulz kernels with the tiled GEMM) for both dtypes;
* the stored passes (:mod:`fastopt.backends.cuda.stored_passes`): the stored norm
  pass of LAMB and LARS and Muon's stored phase 1, every variant, for float32 with
  16/8-bit state, float64 with float32 and 8-bit state, bfloat16 parameters with
  float32, 16- and 8-bit state (``bf16_update`` modes cycled; float32 and bfloat16
  gradients); with 8-bit state phase 1's PTX is checked for a thread block per
  8-bit block (:func:`check_q8_layout`; the stored update kernels:
  ``tests/test_cuda_storage.py``);

and checks that the PTX has no approximate square root or division and that the
dense kernel loads through the pointer table.

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
    from fastopt import benchmark, planner, rules
    from fastopt.backends import cuda as cb
    from fastopt.backends.base import Config

    i64 = types.int64
    tab = types.Array(i64, 2, "C")
    idx = types.Array(i64, 1, "C")
    f64_2d = types.Array(types.float64, 2, "C")
    fty = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}

    def ptx_of(kernel, sig):
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        assert "sqrt.approx" not in ptx and "div.approx" not in ptx \
            and "div.full" not in ptx, "approximate sqrt or division"
        return ptx

    def arrays(cfg):
        el = fty[np.dtype(cfg.dtype)]
        return types.Array(el, 1, "C"), types.Array(el, 2, "C")

    def dense(cfg):
        ptx = ptx_of(cb.make_dense_kernel(cfg), (tab, idx, tab, f64_2d))
        assert "ld.param" in ptx and ("ld.f" in ptx or "ld.global" in ptx), \
            "the dense kernel does not load through the pointer table"

    def rows(cfg, catch, step):
        _, a2 = arrays(cfg)
        ptx_of(cb.make_rows_kernel(cfg, catch, step),
               (a2,) * 5 + (idx,) * 3 + (f64_2d, f64_2d, i64, types.boolean))

    def renorm(cfg):
        _, a2 = arrays(cfg)
        ptx_of(cb.make_renorm_kernel(cfg), (a2, idx, f64_2d, i64, types.boolean))

    def rowwise(cfg):
        a1, a2 = arrays(cfg)
        ptx_of(cb.make_rowwise_kernel(cfg),
               (a2, a1, a2) + (idx,) * 3 + (a2, f64_2d, i64, types.boolean))

    def norms(cfg):
        ptx_of(cb.make_norms_kernel(cfg), (tab, idx, tab, f64_2d, f64_2d))

    def finite(dt):
        a1 = types.Array(fty[np.dtype(dt)], 1, "C")
        ptx_of(cb.make_count_kernel(), (a1, fty[np.dtype(dt)], idx))

    every_option = dict(clip_value=0.5, l1=0.01, param_min=-2.0, param_max=2.0, max_norm=1.0)
    jobs = []        # (what, function, arguments)
    for name, rule in rules.RULES.items():
        if rule.matrix is not None or rule.factored:   # their own kernels: below
            continue
        exact_ok = rule.catch_up is not None
        options = {k: v for k, v in every_option.items()
                   if not (rule.per_tensor and k == "max_norm")}    # a row option
        for k, variant in enumerate(rule.variants + ({**rule.variants[0], **options},)):
            fused = k == len(rule.variants)
            group = rule.check_group({**rule.defaults, **variant})
            spec = planner.group_spec(rule, group)
            for dt in (np.float32, np.float64):
                cfg = planner.config(rule, dt, spec, grad_scale=1.0 if fused else None)
                what = f"{name} {'every fused option' if fused else variant} " \
                       f"{np.dtype(dt).name}"
                if rule.layout == "rowwise":
                    jobs.append((f"rowwise {what}", rowwise, (cfg,)))
                    continue
                if rule.per_tensor:            # whole tensors: the norm pass and dense
                    jobs.append((f"norms {what}", norms, (cfg,)))
                    jobs.append((f"dense {what}", dense, (cfg,)))
                    continue
                jobs.append((f"rows {what}", rows, (cfg, False, True)))
                if fused:
                    no_max = Config(rule=cfg.rule, dtype=cfg.dtype, uses=cfg.uses,
                                    fixed=cfg.fixed, switches=cfg.switches[:5] + (False,))
                    jobs.append((f"dense {what}", dense, (no_max,)))
                    jobs.append((f"renorm {what}", renorm, (cfg,)))
                else:
                    jobs.append((f"dense {what}", dense, (cfg,)))
                    if exact_ok and rule.exact_refusal(group) is None:
                        jobs.append((f"rows exact {what}", rows, (cfg, True, True)))
                        jobs.append((f"rows flush {what}", rows, (cfg, True, False)))
    for dt in (np.float32, np.float64):
        jobs.append((f"finite {np.dtype(dt).name}", finite, (dt,)))
    jobs += factored_jobs(types, ptx_of) + matrix_jobs(types, ptx_of) + \
        stored_pass_jobs(types, ptx_of)
    jobs.append(("ceiling", dense, (Config(rule=benchmark.CEILING, dtype=np.dtype(np.float32),
                                           uses=(True, True, True)),)))
    for what, fn, args in jobs:
        try:
            fn(*args)
        except Exception as exc:   # noqa: BLE001 (report which kernel, then fail)
            print(f"FAILED to compile {what}: {type(exc).__name__}: {exc}")
            return 1
    print(f"compiled {len(jobs)} kernels to PTX")
    return 0


def check_q8_layout(ptx, what):
    """An 8-bit kernel with a thread block per 8-bit block (stored dense, stored rows
    without ``max_norm``, Muon's stored phase 1; :mod:`fastopt.backends.cuda.stored`):
    its PTX synchronizes the block (``bar.sync``, the shared-memory max of the block
    scale) and keeps no per-thread buffer of a block's values (a local array of
    ``Q8_BLOCK`` values is 1 KiB or more of local memory)."""
    import re
    from fastopt.storage import Q8_BLOCK
    depot = max((int(x) for x in re.findall(r"__local_depot\d+\[(\d+)\]", ptx)), default=0)
    assert "bar.sync" in ptx, f"{what}: no barrier (a thread per 8-bit block?)"
    assert depot < 4 * Q8_BLOCK, f"{what}: {depot} bytes of local memory a thread"


def factored_jobs(types, ptx_of):
    """The factored passes (Adafactor, :mod:`fastopt.backends.cuda.factored`) for both
    dtypes, with the argument kinds of its ``SIGNATURES``."""
    import numpy as np
    from fastopt.backends.cuda import factored
    jobs = []
    for dt in (np.float32, np.float64):
        el = types.float32 if dt == np.float32 else types.float64
        kinds = {"a": types.Array(el, 1, "C"), "d": types.Array(types.float64, 1, "C"),
                 "s": el, "i": types.int64}
        for kind, sig in factored.SIGNATURES.items():
            k = factored.kernel(kind, dt)
            jobs.append((f"factored {kind} {np.dtype(dt).name}",
                         lambda k=k, sig=sig: ptx_of(k, tuple(kinds[c] for c in sig)), ()))
    return jobs


def stored_pass_jobs(types, ptx_of):
    """The stored passes (:mod:`fastopt.backends.cuda.stored_passes`) of the
    per-tensor and matrix rules for the planner's stored configurations."""
    import numpy as np
    from fastopt import planner, rules, storage
    from fastopt.backends.cuda import stored_passes as sp
    from fastopt.storage import io
    i64, f64_2d = types.int64, types.Array(types.float64, 2, "C")
    tab, idx = types.Array(i64, 2, "C"), types.Array(i64, 1, "C")
    nbt = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64,
           np.dtype(np.uint8): types.uint8, np.dtype(np.uint16): types.uint16}

    def arr(dt):
        return types.Array(nbt[np.dtype(dt)], 1, "C")

    modes = storage.BF16_UPDATES
    jobs = []
    for name, rule in rules.RULES.items():
        if not (rule.per_tensor or rule.matrix is not None):
            continue
        for v, variant in enumerate(rule.variants):
            group = rule.check_group({**rule.defaults, **variant})
            spec = planner.group_spec(rule, group)
            for k, (dt, bits) in enumerate(((np.float32, 16), (np.float32, 8),
                                            (np.float64, 32), (np.float64, 8),
                                            (storage.BF16, None), (storage.BF16, 16),
                                            (storage.BF16, 8))):
                mode = modes[(v + k) % 4] if dt is storage.BF16 else None
                st = storage.storage_for(rule, np.zeros((64, 300), dt), bits, mode)
                if st.native:
                    continue
                cfg0 = planner.config(rule, dt, spec, storage=st)
                grads = ("native",) if st.param == "native" else ("float32", "bfloat16")
                for gk in grads:
                    cfg = cfg0.with_grad(gk)
                    what = f"{name} {variant} {np.dtype(dt).name} state_bits={bits} " \
                           f"{mode} grad={gk}"
                    if rule.per_tensor:
                        jobs.append((f"stored norms {what}", lambda cfg=cfg: ptx_of(
                            sp.make_stored_norms_kernel(cfg),
                            (tab, idx, idx, tab, tab, f64_2d, f64_2d)), ()))
                        continue
                    CT = np.dtype(cfg.compute_dtype).type
                    _, GDT, SDT, _ = io.dtypes(st, gk, CT)
                    def phase1(cfg=cfg, CT=CT, G=GDT, S=SDT, what=what):
                        ptx = ptx_of(sp.make_stored_phase1_kernel(cfg),
                                     (arr(G), arr(S), arr(np.float32), arr(CT), f64_2d,
                                      i64, i64, i64, i64))
                        if cfg.storage.state == "q8":
                            check_q8_layout(ptx, f"stored phase1 {what}")
                    jobs.append((f"stored phase1 {what}", phase1, ()))
    return jobs


def matrix_jobs(types, ptx_of):
    """The matrix phase (Muon, :mod:`fastopt.backends.cuda.matrix`): element phase 1
    for the planner's configurations of every variant, and the Newton-Schulz kernels
    (load, norm, divide, tiled GEMM, store) for both iteration and parameter dtypes."""
    import numpy as np
    from fastopt import planner, rules
    from fastopt.backends.cuda import matrix
    i64, f64 = types.int64, types.float64
    jobs = []
    for name, rule in rules.RULES.items():
        if rule.matrix is None:
            continue
        for variant in rule.variants:
            group = rule.check_group({**rule.defaults, **variant})
            spec = planner.group_spec(rule, group)
            for dt in (np.float32, np.float64):
                cfg = planner.config(rule, dt, spec)
                a1 = types.Array(types.float32 if dt == np.float32 else f64, 1, "C")
                k = matrix.kernel("phase1", rule, np.dtype(dt).type, tuple(cfg.fixed))
                jobs.append((f"matrix phase1 {name} {variant} {np.dtype(dt).name}",
                             lambda k=k, a1=a1: ptx_of(
                                 k, (a1, a1, a1, types.Array(f64, 2, "C"), i64)), ()))
    for dt in (np.float32, np.float64):
        el = types.float32 if dt == np.float32 else f64
        a1 = types.Array(el, 1, "C")
        t = np.dtype(dt).type
        nm = np.dtype(dt).name
        for other in (np.float32, np.float64):      # the other side of the casts
            o1 = types.Array(types.float32 if other == np.float32 else f64, 1, "C")
            jobs.append((f"matrix load {nm} from {np.dtype(other).name}",
                         lambda t=t, a1=a1, o1=o1: ptx_of(
                             matrix.kernel("load", t), (o1, a1, i64, i64, types.boolean, i64)),
                         ()))
            jobs.append((f"matrix store {nm} from {np.dtype(other).name}",
                         lambda t=t, a1=a1, o1=o1, el=el: ptx_of(
                             matrix.kernel("store", t), (o1, a1, i64, i64, types.boolean, el)),
                         ()))
        jobs.append((f"matrix sumsq {nm}", lambda t=t, a1=a1: ptx_of(
            matrix.kernel("sumsq", t, matrix.REDUCE_THREADS),
            (a1, i64, i64, f64, types.Array(f64, 2, "C"))), ()))
        jobs.append((f"matrix divide {nm}", lambda t=t, a1=a1: ptx_of(
            matrix.kernel("divide", t), (a1, i64, a1)), ()))
        jobs.append((f"matrix gemm {nm}", lambda t=t, a1=a1, el=el: ptx_of(
            matrix.kernel("gemm", t, matrix.TILE),
            (a1,) * 4 + (i64,) * 9 + (el, el)), ()))
    return jobs


if __name__ == "__main__":
    sys.exit(main())
