"""The matrix phase of the matrix rules (Muon) on the CUDA backend
(:mod:`fastopt.matrix_phase`; the CPU twin is :mod:`fastopt.backends.matrix_cpu`).

Per tensor ``[..., M, N]`` of a bucket (``Bt`` matrices of ``M x N``):

1. element phase 1: the ``phase1`` kernel runs the rule's ``phase1``
   (:func:`fastopt.rules.muon.momentum`) per element, with the tensor's scalars
   loaded by :func:`fastopt.backends.element.scalar_loader` from the bucket's float64
   scalar rows (one copy per bucket and step), as the dense kernels load them: the
   momentum buffer is updated in place and the direction ``U`` written to a new
   device array;
2. the orthogonalization :func:`fastopt.rules.muon.newton_schulz` on the device, in
   the iteration dtype (:func:`fastopt.rules.muon.ns_dtype`), batched over the
   ``Bt`` matrices: ``load`` (``X = U``, transposed when tall, in the iteration
   dtype), ``sumsq`` (per matrix, the float64 sum of squares of ``X`` in a fixed
   tree and its largest magnitude; the host forms the norm, clamps it to ``eps``
   and, where the squares overflowed, rescales by the largest magnitude as the CPU
   does), ``divide`` (``X /= norm``), then ``ns_steps`` times three products of the
   tiled ``gemm`` kernel, ``A = X X^T``, ``P = c A A + b A``, ``X = P X + a X``, and
   ``store`` (``O = r X``, transposed back, in the parameter's dtype, ``r`` the
   rule's :func:`~fastopt.rules.muon.adjust_ratio`);
3. element phase 2 is the bucket's dense kernel with ``O``'s address in the
   gradient column (``work.ptrs[:, 1]``), which the dense launch copies every step.

The products go through the caller's array library when the process has imported
one (:data:`GEMM` ``"auto"``: torch seeing a GPU, else CuPy; their batched matmul is
cuBLAS) on strided views of the same device buffers (:class:`ArrayLib`, the CPU's
operations in the CPU's order), and otherwise through the tiled ``gemm`` kernel.
``gemm`` computes ``Out = alpha (A B) + beta Cin`` for each matrix of a batch
(``blockIdx.z``), ``A`` and ``B`` read through strides (so ``X^T`` is ``X`` with its
strides swapped, no copy), one ``TILE x TILE`` output tile per block, the ``K``
dimension in shared-memory tiles of ``TILE``; each output element sums its products
in ``k`` order in the iteration dtype (as BLAS accumulates, not in BLAS's order, so
results agree with the CPU backends to rounding).  It is deterministic and fits any
GPU, at a fraction of cuBLAS's rate: Muon's matrix phase on a GPU is bound by these
products.  The library adapters are tested in the simulator with NumPy standing in
for the library (tests/test_muon_cuda.py); no GPU has run the torch or CuPy ones.  ``ns_dtype="bfloat16"`` runs the rule's own torch bfloat16 iterations
(:func:`~fastopt.rules.muon.newton_schulz_bf16`) on a host copy (torch on the CPU:
correct and slow).
"""

import math

import numpy as np

from ...rules import muon as _muon
from ..element import scalar_loader
from .. import cuda as _pkg
from .arrays import _address, _flat

#: the side of a GEMM tile (threads per block: TILE x TILE; a compile-time size)
TILE = 16
#: threads of a reducing block (the norm's tree)
REDUCE_THREADS = 128

_KERNELS = {}
cuda = None          # numba.cuda, bound by _make (a global: the simulator replaces it)


def _make(kind, key):
    global cuda
    from .kernels import _prepare
    cuda = _prepare()

    if kind == "phase1":
        rule, dtype, fixed = key
        PHASE1 = rule.phase1
        LOAD = scalar_loader(rule.Scalars, dtype, fixed)

        def phase1(G, Bf, U, hyper, row):
            c = LOAD(hyper, row)
            i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while i < G.shape[0]:
                b, u = PHASE1(G[i], Bf[i], c)
                Bf[i] = b
                U[i] = u
                i += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(phase1)

    if kind == "load":
        (NDT,) = key
        TO = np.dtype(NDT).type

        def load(U, X, M, N, tall, nmat):
            # X[z] (m x n, wide) = U[z] (M x N), transposed when tall
            L = M * N
            e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while e < nmat * L:
                z = e // L
                q = e - z * L
                if tall:                 # X[z][i, j] = U[z][j, i], X is N x M
                    i = q // M
                    j = q - i * M
                    X[e] = TO(U[z * L + j * N + i])
                else:
                    X[e] = TO(U[e])
                e += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(load)

    if kind == "sumsq":
        NT = key[1]

        def sumsq(X, L, nmat, scale, out):
            sa = cuda.shared.array(NT, np.float64)
            sm = cuda.shared.array(NT, np.float64)
            tid = cuda.threadIdx.x
            z = cuda.blockIdx.x
            while z < nmat:
                a = 0.0
                mx = 0.0
                i = tid
                while i < L:
                    x = np.float64(X[z * L + i]) * scale
                    a += x * x
                    ax = abs(x)
                    if not ax <= mx:         # a NaN stays
                        mx = ax
                    i += NT
                sa[tid] = a
                sm[tid] = mx
                cuda.syncthreads()
                h = NT // 2
                while h > 0:
                    if tid < h:
                        sa[tid] += sa[tid + h]
                        if not sm[tid + h] <= sm[tid]:
                            sm[tid] = sm[tid + h]
                    cuda.syncthreads()
                    h //= 2
                if tid == 0:
                    out[z, 0] = sa[0]
                    out[z, 1] = sm[0]
                cuda.syncthreads()
                z += cuda.gridDim.x
        return cuda.jit(sumsq)

    if kind == "divide":
        def divide(X, L, d):
            e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while e < X.shape[0]:
                X[e] = X[e] / d[e // L]
                e += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(divide)

    if kind == "gemm":
        NDT, TS = key
        DT = np.dtype(NDT).type

        def gemm(A, Bm, Cin, Out, M, N, K, sam, sak, sbk, sbn, sab, sbb, alpha, beta):
            # Out[z] (M x N, contiguous) = alpha A[z] B[z] + beta Cin[z]
            ta = cuda.shared.array((TS, TS), NDT)
            tb = cuda.shared.array((TS, TS), NDT)
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            z = cuda.blockIdx.z
            i = cuda.blockIdx.y * TS + ty
            j = cuda.blockIdx.x * TS + tx
            abase = z * sab
            bbase = z * sbb
            zero = DT(0)
            acc = zero
            for k0 in range(0, K, TS):
                ka = k0 + tx
                if i < M and ka < K:
                    ta[ty, tx] = A[abase + i * sam + ka * sak]
                else:
                    ta[ty, tx] = zero
                kb = k0 + ty
                if kb < K and j < N:
                    tb[ty, tx] = Bm[bbase + kb * sbk + j * sbn]
                else:
                    tb[ty, tx] = zero
                cuda.syncthreads()
                for kk in range(TS):
                    acc += ta[ty, kk] * tb[kk, tx]
                cuda.syncthreads()
            if i < M and j < N:
                o = z * M * N + i * N + j
                if beta == zero:         # BLAS: Cin is not read (it may be garbage)
                    Out[o] = alpha * acc
                else:
                    Out[o] = alpha * acc + beta * Cin[o]
        return cuda.jit(gemm)

    if kind == "store":
        (PDT,) = key
        TO = np.dtype(PDT).type

        def store(X, O, M, N, tall, r):
            # O[z] (M x N) = r X[z], transposed back when tall, in the parameter dtype
            L = M * N
            e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while e < O.shape[0]:
                z = e // L
                q = e - z * L
                if tall:                 # O[z][i, j] = X[z][j, i], X is N x M
                    i = q // N
                    j = q - i * N
                    O[e] = TO(X[z * L + j * M + i]) * r
                else:
                    O[e] = TO(X[e]) * r
                e += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(store)

    raise KeyError(kind)


def kernel(kind, *key):
    k = (kind, key, _pkg._SIM)
    out = _KERNELS.get(k)
    if out is None:
        out = _KERNELS[k] = _make(kind, key)
    return out


def _grid(n):
    from .launch import _blocks
    bs = _pkg.BLOCK_SIZE
    return _blocks(n, bs), bs


class ArrayLib:
    """The Newton-Schulz products through an array library (cuBLAS behind torch or
    CuPy): ``view(d, shape, strides)`` is the library's array over the memory of the
    flat numba device array ``d`` (no copy; ``strides`` in elements), ``matmul(a, b,
    out)`` writes the batched product ``a @ b`` into ``out``, ``sync()`` waits for the
    library's current stream (the products are ordered after the kernels by
    :func:`orthogonalize`'s device synchronization, and the kernels after them by
    this)."""

    def __init__(self, name, view, matmul, sync=lambda: None):
        self.name, self.view, self.matmul, self.sync = name, view, matmul, sync

    def gemm(self, A, B, Cin, Out, M, N, K, a_strides, b_strides, nmat, alpha, beta):
        """:func:`gemm` as the CPU forms it: ``Out = A B``, then ``Out *= alpha``,
        then ``Out += beta Cin`` (Python floats: the libraries compute in the arrays'
        dtype)."""
        sam, sak, sab = a_strides
        sbk, sbn, sbb = b_strides
        o = self.view(Out, (nmat, M, N), (M * N, N, 1))
        self.matmul(self.view(A, (nmat, M, K), (sab, sam, sak)),
                    self.view(B, (nmat, K, N), (sbb, sbk, sbn)), o)
        if alpha != 1:
            o *= float(alpha)
        if beta != 0:
            o += float(beta) * self.view(Cin, (nmat, M, N), (M * N, N, 1))


def _torch():
    import torch

    def view(d, shape, strides):
        return torch.as_tensor(d, device="cuda").as_strided(shape, strides)
    return ArrayLib("torch", view, lambda a, b, o: torch.matmul(a, b, out=o),
                    lambda: torch.cuda.current_stream().synchronize())


def _cupy():
    import cupy
    from cupy.lib.stride_tricks import as_strided

    def view(d, shape, strides):
        x = cupy.asarray(d)
        return as_strided(x, shape, tuple(s * x.itemsize for s in strides))
    return ArrayLib("cupy", view, lambda a, b, o: cupy.matmul(a, b, out=o),
                    lambda: cupy.cuda.get_current_stream().synchronize())


#: where the Newton-Schulz products run: ``"auto"`` (the caller's array library,
#: i.e. cuBLAS: torch when the process has imported it and it sees a GPU, else CuPy
#: when imported; otherwise, and always in the simulator, the ``gemm`` kernel),
#: ``"kernel"``, ``"torch"``, ``"cupy"``, or an :class:`ArrayLib`
GEMM = "auto"
_LIBS = {}


def library():
    """The :class:`ArrayLib` the products go through, or None for the ``gemm`` kernel
    (read at every step: :data:`GEMM`)."""
    import sys
    choice = GEMM
    if isinstance(choice, ArrayLib):
        return choice
    if choice == "kernel" or (choice == "auto" and _pkg._SIM):
        return None
    if choice == "auto":
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            choice = "torch"
        elif sys.modules.get("cupy") is not None:
            choice = "cupy"
        else:
            return None
    lib = _LIBS.get(choice)
    if lib is None:
        lib = _LIBS[choice] = {"torch": _torch, "cupy": _cupy}[choice]()
    return lib


def gemm(A, B, Cin, Out, M, N, K, a_strides, b_strides, nmat, alpha, beta):
    """``Out[z] = alpha A[z] B[z] + beta Cin[z]`` for ``z < nmat`` (``Cin`` not read when
    ``beta`` is 0, as in BLAS) by the tiled ``gemm`` kernel: flat device arrays;
    ``a_strides = (row, k, matrix)`` and ``b_strides = (k, column, matrix)`` in
    elements; ``Out`` and ``Cin`` contiguous ``M x N`` per matrix."""
    ts = int(TILE)
    dt = np.dtype(Out.dtype)
    sam, sak, sab = a_strides
    sbk, sbn, sbb = b_strides
    grid = (-(-N // ts), -(-M // ts), nmat)
    kernel("gemm", dt.type, ts)[grid, (ts, ts)](
        A, B, Cin, Out, M, N, K, sam, sak, sbk, sbn, sab, sbb, dt.type(alpha), dt.type(beta))


def orthogonalize(U, shape, group, pdt):
    """``r * NS(U)`` (what phase 2 reads in the gradient's place) of the flat device
    array ``U`` of a tensor of ``shape``, as a new flat device array of ``pdt``."""
    pdt = np.dtype(pdt)
    n_el = U.shape[0]
    out = _pkg.cuda.device_array(n_el, dtype=pdt)
    r = _muon.adjust_ratio(group["adjust_lr_fn"], shape)
    if group["ns_dtype"] == "bfloat16":      # torch's bfloat16 GEMM, on the host
        o = _muon.orthogonalized(U.copy_to_host().reshape(shape), group, pdt)
        out.copy_to_device(np.ascontiguousarray(o).reshape(-1))
        return out
    ndt = _muon.ns_dtype(group, pdt)
    M, N = shape[-2:]
    nmat = n_el // (M * N)
    tall = M > N
    m, n = (N, M) if tall else (M, N)
    L = m * n
    cuda_ = _pkg.cuda
    X = cuda_.device_array(nmat * L, dtype=ndt)
    X2 = cuda_.device_array(nmat * L, dtype=ndt)
    gram = cuda_.device_array(nmat * m * m, dtype=ndt)
    P = cuda_.device_array(nmat * m * m, dtype=ndt)
    kernel("load", ndt.type)[_grid(nmat * L)](U, X, M, N, tall, nmat)
    # the norms: float64 sums of squares per matrix, the largest magnitudes
    nt = int(REDUCE_THREADS)
    from .launch import _blocks
    sums = cuda_.device_array((nmat, 2), dtype=np.float64)
    kernel("sumsq", ndt.type, nt)[_blocks(nmat, 1), nt](X, L, nmat, 1.0, sums)
    h = sums.copy_to_host()
    norms = np.sqrt(h[:, 0])
    over = np.isinf(h[:, 0]) & np.isfinite(h[:, 1]) & (h[:, 1] > 0)
    if over.any():                    # the squares overflowed: rescale by the largest
        for z in np.flatnonzero(over):
            amax = h[z, 1]
            one = cuda_.device_array((1, 2), dtype=np.float64)
            kernel("sumsq", ndt.type, nt)[1, nt](X[z * L:(z + 1) * L], L, 1, 1.0 / amax, one)
            norms[z] = amax * math.sqrt(one.copy_to_host()[0, 0])
    norms = norms.astype(ndt)
    e = ndt.type(group["eps"])
    d = np.where(norms < e, e, norms).astype(ndt)     # a NaN norm stays NaN
    kernel("divide", ndt.type)[_grid(nmat * L)](X, L, cuda_.to_device(d))
    a, b, c = group["ns_coefficients"]
    lib = library()
    mm = gemm if lib is None else lib.gemm
    if lib is not None:
        cuda_.synchronize()          # the kernels above, before the library's stream
    for _ in range(group["ns_steps"]):
        # A = X X^T (m x m): A[i, j] = sum_k X[i, k] X[j, k]
        mm(X, X, gram, gram, m, m, n, (n, 1, L), (1, n, L), nmat, 1.0, 0.0)
        # P = c A A + b A
        mm(gram, gram, gram, P, m, m, m, (m, 1, m * m), (m, 1, m * m), nmat, c, b)
        # X = P X + a X
        mm(P, X, X, X2, m, n, m, (m, 1, m * m), (n, 1, L), nmat, 1.0, a)
        X, X2 = X2, X
    if lib is not None:
        lib.sync()                   # the products, before the kernels below
    kernel("store", pdt.type)[_grid(n_el)](X, out, M, N, tall, pdt.type(r))
    return out


def run_matrix(work, groups):
    """Phases 1 and 2 of the bucket ``work`` (see the module docstring); afterwards
    ``work.grads[t]`` is the tensor's ``r * O`` and ``work.ptrs[t, 1]`` its address.
    A stored format (bfloat16 parameters, 16/8-bit momentum): phase 1 is the
    ``stored_phase1`` kernel (:mod:`fastopt.backends.cuda.stored_passes`), ``O`` is
    in the compute dtype and the bucket's configuration reads it so (as the CPU's
    :func:`fastopt.backends.matrix_cpu.run_matrix`)."""
    cfg = work.config
    rule = cfg.rule
    stored = not cfg.storage.native
    dt = np.dtype(cfg.compute_dtype)
    hyper = _pkg.cuda.to_device(np.ascontiguousarray(work.hyper, dtype=np.float64))
    if stored:
        from .launch import kernel_for
        p1 = kernel_for("stored_phase1", cfg)
    else:
        p1 = kernel("phase1", rule, dt.type, tuple(cfg.fixed))
    out = []
    for t, g in enumerate(work.grads):
        p = work.params[t]
        shape = tuple(p.shape)
        G = _flat(g)
        n = G.shape[0]
        Bf = _flat(work.slots[t][0])
        U = _pkg.cuda.device_array(n, dtype=dt)
        if n:
            if stored:
                _stored_phase1(p1, work, t, G, Bf, U, hyper)
            else:
                p1[_grid(n)](G, Bf, U, hyper, int(work.hidx[t]))
            o = orthogonalize(U, shape, groups[t], dt)
        else:
            o = U
        out.append(o)
        work.ptrs[t, 1] = _address(o)
    work.grads = out
    if stored and out:
        # phase 2 reads O, in the compute dtype, in the gradient's place
        from ...planner import grad_kind
        work.config = cfg.with_grad(grad_kind(cfg.storage, out[0]))


def _stored_phase1(p1, work, t, G, Bf, U, hyper):
    """Launch the ``stored_phase1`` kernel over tensor ``t`` of ``work``: 8-bit blocks
    (the format table's rows, blocks per row and scale count), a thread block each,
    or elements, a thread each."""
    from ..base import FMT_NB, FMT_NSCALE, FMT_ROW
    from .arrays import _dummy
    from .launch import _blocks
    from .stored import Q8_THREADS
    row = int(work.hidx[t])
    if work.config.storage.state == "q8":
        f = work.fmt[t]
        D, nb, units = int(f[FMT_ROW]), int(f[FMT_NB]), int(f[FMT_NSCALE])
        C0 = _flat(work.extras[t][1])
        grid = _blocks(units), Q8_THREADS       # a thread block per 8-bit block
    else:
        D, nb, units = 1, 1, int(G.shape[0])
        C0 = _dummy((1,), np.float32)
        grid = _grid(units)
    p1[grid](G, Bf, C0, U, hyper, row, D, nb, units)
