"""The backend interface: work items, the capability table and host-array plumbing.

A backend runs two kinds of work, both built by the step planner
(:mod:`fastopt.planner`) for the optimizer classes and the functional layer alike:

* :class:`DenseWork`: a *bucket* of tensors sharing one :class:`Config` (rule,
  dtype, used state slots, compiled-in scalars, fused switches), with its pointer
  table, chunk table and float64 scalar rows;
* :class:`RowsWork`: the touched rows of one parameter (a row-sparse gradient, a
  dense step of a row-wise rule or of a ``max_norm`` group, or an exact-mode
  catch-up), with its deterministic coalescing plan.

:data:`FEATURES` names what a backend can do; a backend class declares the
features it has in ``features`` and nothing else in the package asks a backend
what it can do (``fastopt.backends.capabilities()`` prints the table, the
optimizer refuses a missing feature before anything is written, the tests
iterate over it).
"""

import os
from dataclasses import dataclass, field, replace
from typing import List

import numpy as np

from ..arrays import as_grad, as_param
from ..storage import NATIVE, compute_dtype

try:
    from .._cy_util import data_address, gather_grads
except ImportError:          # a source tree without the compiled extensions
    from .._py_util import data_address, gather_grads

#: Elements per chunk of a dense bucket (the CPU backends): big enough to amortize the
#: per-chunk setup, small enough to balance 1,000 mid-size tensors over the threads.
CHUNK = 1 << 15
#: Below this many elements in a step, the CPU backends run serially (a parallel
#: region costs more than it saves).  This is the default: the value in force is
#: ``fastopt.backends.numba_cpu.PARALLEL_MIN`` once that module is loaded (tests set
#: it there; the Cython backend reads it from there without importing numba).
PARALLEL_MIN = 1 << 15

_FORKED = False


def _after_fork_in_child():
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def may_use_threads():
    """False in a process forked from this one.  Neither GNU OpenMP (Numba's ``omp``
    threading layer, the Cython extension) nor Numba's other layers can start a
    parallel region in a forked child (the child is killed or hangs), so a child
    steps with the serial drivers: correct, one thread.  Workers that should step
    in parallel are started with the ``spawn`` (or ``forkserver``) method."""
    return not _FORKED


#: feature -> what it means
FEATURES = {
    "dense": "dense gradients, many tensors per launch",
    "sparse_lazy": "row-sparse gradients, lazy mode (touched rows only)",
    "sparse_exact": "row-sparse gradients, exact mode (closed-form catch-up)",
    "rowwise": "row-wise rules (one state value per row)",
    "tensor_norms": "per-tensor rules (LAMB, LARS): a norm pass over each tensor, then the "
                    "update pass",
    "matrix": "matrix rules (Muon): a phase on whole matrices (Newton-Schulz: BLAS on the "
              "CPU, a GEMM kernel on CUDA) between the element phases",
    "factored": "factored rules (Adafactor): row and column sums of each tensor, then the "
                "RMS of the update, then the update pass",
    "fused_options": "clip_value, l1, param_min, param_max, max_norm in the update pass",
    "grad_scale": "step(grad_scale=...) divides gradients inside the update pass",
    "skip_nonfinite": "step(skip_nonfinite=True) skips a step with an Inf/NaN gradient",
    "float32": "float32 parameters and state",
    "float64": "float64 parameters and state",
    "bfloat16": "bfloat16 parameters (bf16_update: split, kahan, stochastic, nearest)",
    "state16": "state_bits=16: bfloat16 optimizer state",
    "state8": "state_bits=8: block-wise 8-bit optimizer state",
    "stored_passes": "the per-tensor and matrix rules (LAMB, LARS, Muon) with bfloat16 "
                     "parameters or 16/8-bit state: the norm pass and the matrix phase read "
                     "the storage formats",
}


def make_chunks(sizes, chunk=CHUNK):
    """Chunk table (tensor, start, stop) for tensors of the given element counts."""
    rows = []
    for t, n in enumerate(sizes):
        for lo in range(0, n, chunk):
            rows.append((t, lo, min(lo + chunk, n)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def stored_chunks(sizes_rows, blk, chunk=CHUNK):
    """Chunk table (tensor, first block, end block) of a stored-format bucket:
    ``sizes_rows``: per tensor (rows, blocks per row); about ``chunk`` elements per
    chunk."""
    per = max(1, chunk // blk)
    out = []
    for t, (r, nb) in enumerate(sizes_rows):
        total = r * nb
        for lo in range(0, total, per):
            out.append((t, lo, min(lo + per, total)))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


@dataclass(frozen=True)
class Config:
    """What a compiled kernel is specialized on."""
    rule: object                      # fastopt.rules.Rule
    dtype: np.dtype
    uses: tuple                       # which of the NSLOTS state slots are used
    fixed: tuple = ()                 # ((Scalars field, value), ...) compiled in
    switches: tuple = (False,) * 6    # fused switches (fastopt.rules.fused.SWITCHES)
    storage: object = NATIVE          # fastopt.storage.Storage of param and state
    grad: str = "native"              # gradient dtype: "native", "float32", "bfloat16"

    def with_grad(self, kind):
        return self if kind == self.grad else replace(self, grad=kind)

    @property
    def compute_dtype(self):
        return self.dtype if self.storage.native else compute_dtype(self.dtype)

    def with_grad_scale(self, on):
        if bool(on) == self.switches[0]:
            return self
        return replace(self, switches=(bool(on),) + tuple(self.switches[1:]))

    @property
    def fusing(self):
        return any(self.switches)


def norm_uses(config):
    """The state slots a stored norm pass loads: the used ones among the rule's first
    ``norm_reads`` (LAMB: m and v; LARS: none)."""
    return tuple(bool(u) and k < config.rule.norm_reads for k, u in enumerate(config.uses))


@dataclass
class DenseWork:
    config: Config
    index: List[int]                  # caller's tensor indices
    params: List[np.ndarray]
    grads: List[np.ndarray] = field(default_factory=list)
    slots: List[list] = field(default_factory=list)   # per tensor: NSLOTS arrays or None
    ptrs: np.ndarray = None           # int64 (T, 2 + NSLOTS): param, grad, slot addresses
    chunks: np.ndarray = None         # int64 (C, 3): (tensor, start, stop)
    hyper: np.ndarray = None          # float64 (R, NSCALARS): per-step scalar rows
    hidx: np.ndarray = None           # int64 (T,): scalar row of each tensor
    nelem: int = 0
    # the reference backend: per tensor (group dict, step, state dict, fresh names)
    ref: list = None
    grad_scale: float = None
    #: stored formats (config.storage not native), and every bucket of a backend
    #: without ``plain_layout``: int64 (T, FMT_COLS), per
    #: tensor the addresses of the aux array and the three 8-bit scale arrays, the
    #: element count, row length, blocks per row, scale count, stream key and
    #: element base (columns FMT_*); ``chunks`` then count blocks, not elements.
    #: The element base is the flat index of the tensor's first element in the
    #: tensor it is a row range of (0 for a whole tensor): stochastic rounding draws
    #: ``random16(key, base + e)``, so a shard rounds as the whole tensor would
    fmt: np.ndarray = None
    extras: List[list] = None         # per tensor: [aux, scale0, scale1, scale2] or None
    #: a backend's launch state for this bucket (the CUDA backend: its device tables,
    #: :class:`fastopt.backends.cuda.launch.DenseTables`), keyed by backend name,
    #: prepared on the bucket's first launch and kept while the bucket (a cached
    #: plan) lives; a rebuilt plan is new work items, prepared again.  Address columns
    #: other than the gradient's (``ptrs`` 0 and 2.., ``fmt``'s addresses) do not
    #: change in a bucket's life.  The copies :func:`fastopt.planner.fill_bucket` makes
    #: share this dict.
    launch: dict = field(default_factory=dict, repr=False, compare=False)


FMT_AUX, FMT_SCALE, FMT_N, FMT_ROW, FMT_NB, FMT_NSCALE, FMT_KEY, FMT_BASE = \
    0, 1, 4, 5, 6, 7, 8, 9
FMT_COLS = 10


@dataclass
class CatchUp:
    """Exact sparse mode: the rows of a :class:`RowsWork` are first brought from
    step ``last[u]`` to ``t_end`` as if they had received zero gradients."""
    last: np.ndarray                  # int64 (nuniq,): step each row is up to date with
    t_end: int
    buffer_start: int                 # step at which SGD's momentum buffer was created
    group: dict                       # hyperparameters of the skipped steps
    scalars: tuple                    # their float64 scalar row (for the closed form)
    coef: np.ndarray = None           # float64 (nuniq, 4): the closed form per row


@dataclass
class RowsWork:
    config: Config
    param: np.ndarray                 # the parameter (any shape; rows = first axis)
    slots: list                       # NSLOTS state arrays or None
    vals: np.ndarray                  # (nnz, D) gradient rows, or None: catch-up only
    idx: np.ndarray                   # (nnz,) int64 row indices (validated)
    order: np.ndarray                 # coalescing plan (fastopt.sparse.coalesce_plan)
    seg: np.ndarray
    uniq: np.ndarray
    hyper: np.ndarray                 # float64 (1, NSCALARS)
    catch: CatchUp = None
    ref: tuple = None                 # (group, step, state dict, fresh) for the reference
    grad_scale: float = None
    #: stored formats: [aux, scale0, scale1, scale2] arrays (or None), the
    #: stochastic-rounding stream key and the element base (see ``DenseWork.fmt``)
    extras: list = None
    key: int = 0
    base: int = 0
    #: (nnz,) int64 the unique row of each gradient row (fastopt.sparse.row_plan), or
    #: None (a dense or catch-up plan: every gradient row is its own unique row)
    inverse: np.ndarray = None


class Backend:
    """Base of every backend: its name, memory, capability table and array methods.

    ``features``: the subset of :data:`FEATURES` the backend implements.
    ``memory``: ``"host"`` (NumPy arrays) or ``"device"`` (CUDA arrays).
    """

    name = None
    memory = "host"
    features = frozenset(FEATURES)
    #: whether float32/float64 buckets are planned for plain drivers (element
    #: chunks, no ``fmt`` table); False where one set of drivers runs every
    #: storage format, float32/float64 as the format whose loads and stores are
    #: the identity (the CPU backends: ``fmt`` and block chunks for every bucket)
    plain_layout = True
    #: whether the row plans of sparse steps carry ``RowsWork.inverse`` (the unique
    #: row of each gradient row: the Cython row driver streams the gradient rows
    #: through it; the numba and CUDA drivers gather each row's duplicates and
    #: skip the map's scattered writes)
    plan_inverse = False

    def supports(self, feature):
        return feature in self.features

    def require(self, feature, what=None):
        """Raise NotImplementedError naming the feature when it is missing."""
        if feature not in self.features:
            from . import capable
            others = [n for n in capable(feature) if n != self.name]
            raise NotImplementedError(
                f"backend {self.name!r} does not support {what or feature} "
                f"({FEATURES[feature]}); backends that do: {others}")

    # arrays ----------------------------------------------------------------
    def as_param(self, obj, where):
        return as_param(obj, where)

    def check_grads(self, dense, plist, active):
        """Check (and where needed convert) gradients; returns (grads, addresses).

        A C loop checks type, shape, dtype and layout and records addresses; the
        slow path converts other float dtypes and non-contiguous gradients, or
        raises.  Nothing is written to any parameter or state here.
        """
        gptr = np.empty((len(dense), 1), dtype=np.int64)
        start, copied = 0, False
        while start < len(dense):
            bad = gather_grads(dense[start:], plist[start:], gptr[start:], 0)
            if bad < 0:
                break
            k = start + bad
            if not copied:
                dense, copied = list(dense), True
            dense[k] = as_grad(dense[k], plist[k], f"gradient {active[k]}")
            gptr[k, 0] = data_address(dense[k])
            start = k + 1
        return dense, gptr[:, 0]

    def all_finite(self, arrays, grad_scale=None):
        """True when no array (divided by ``grad_scale``, in its dtype) holds an
        Inf or NaN."""
        from . import numba_cpu
        return all(numba_cpu.all_finite(
            (a if a.dtype.kind == "f" else a.astype(np.float32)).reshape(-1), grad_scale)
            for a in arrays if a.size)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype=dtype)

    def address(self, a):
        return data_address(a)

    def to_host(self, a):
        return a.copy()

    def from_host(self, a, like):
        return np.array(a, dtype=like.dtype, order="C", copy=True)

    # work ------------------------------------------------------------------
    def run_dense(self, work):
        raise NotImplementedError

    def run_rows(self, work):
        raise NotImplementedError

    @staticmethod
    def element_chunks(work):
        """The bucket's chunk table in elements, ``(tensor, start, stop)`` of at most
        ``CHUNK`` (the norm pass's fixed summation blocks, whatever unit the update
        pass's ``work.chunks`` counts), made once per bucket (``work.launch``)."""
        chunks = work.launch.get("element_chunks")
        if chunks is None:
            chunks = work.launch["element_chunks"] = make_chunks([p.size for p in work.params])
        return chunks

    def run_matrix(self, work, groups):
        """The matrix phase of a matrix rule (``Rule.matrix``) over a
        :class:`DenseWork` bucket, ``groups[t]`` the param group of tensor ``t``
        (:mod:`fastopt.matrix_phase`); host arrays: :mod:`.matrix_cpu`."""
        from .matrix_cpu import run_matrix
        run_matrix(work, groups)
    # factored rules (fastopt/factored.py): one tensor's passes, float64 sums in an
    # order fixed by the shape; B matrices of R x C, or a vector
    def factored_sums(self, P, G, B, R, C):
        """``(row sums of G^2 (B, R), column sums of G^2 (B, C), sum of p^2)``."""
        raise NotImplementedError

    def factored_usq(self, G, rv, cv, m, B, R, C, e2, sign, one):
        """The sum of ``U^2``, ``U = sign G rsqrt(max(rv cv / m, e2))``."""
        raise NotImplementedError

    def factored_apply(self, P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step):
        """``P = P decay + step U``."""
        raise NotImplementedError

    def vector_sums(self, P, G, V, w, omw, sign):
        """``V = lerp(V, G^2, w)`` in place; returns the sum of ``p^2``."""
        raise NotImplementedError

    def vector_usq(self, G, V, e2, sign, one):
        raise NotImplementedError

    def vector_apply(self, P, G, V, e2, sign, one, decay, step):
        raise NotImplementedError

    def run_norms(self, work):
        """The norm pass of a per-tensor rule (``Rule.norms``) over a
        :class:`DenseWork` bucket: a float64 array (tensors, 2) of the sums of squares
        of the rule's two per-element quantities, per tensor in bucket order (each
        chunk summed in element order, the chunks added in order: the result does
        not depend on the thread count)."""
        raise NotImplementedError
