"""Throughput measurement: every implementation of a step, side by side, in one run.

For a *case* (a rule, a list of tensor sizes, a dtype) this module builds one
callable per implementation on identical data:

* ``fastopt-<backend>`` for each available host backend (``numpy`` is the reference);
* ``torch-forloop``, ``torch-foreach``, ``torch-fused`` when torch is installed and
  has the rule (CPU tensors sharing nothing with the others);
* ``ceiling``: a kernel that reads and writes exactly the bytes the rule moves
  (param, gradient, used state slots) with one add per stream and no other math,
  through the same chunked driver — the machine's memory-bandwidth ceiling for
  this access pattern.

Each callable is timed as the best of several repeats after a warm-up (the best is
the least disturbed by a noisy machine).  Results are reported as time per step,
elements/s, GB/s and the fraction of the ceiling; ratios measured in the same run
are the only claims made.  Used by ``python -m fastopt bench`` and by ``bench/``.
"""

import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
from numba.extending import register_jitable

from . import backends
from . import rules as registry
from .backends import numba_cpu
from .backends.base import Config
from .optimizers import CLASSES
from .rules import Rule, scalars_type


@register_jitable
def touch(p, g, s0, s1, s2, c):
    """No-math stand-in for a rule: every stream read, every used stream written
    (one add each, so the compiler cannot drop a store)."""
    return p + g, s0 + g, s1 + g, s2 + g


#: the ceiling kernel's scalars: only the fused fields, all unused
Scalars = scalars_type("CeilingScalars", ())
#: the ceiling as a rule, so that it runs through the same dense driver as every rule
CEILING = Rule(name="ceiling", defaults={}, checks={}, slots=(), uses_slots=lambda g: (),
               Scalars=Scalars, host_scalars=lambda g, step, host, fresh: ({}, host),
               math=touch, reference=None)


@dataclass
class Case:
    rule: str
    sizes: tuple          # element count of each tensor
    dtype: str = "float32"
    variant: int = 0      # index into the rule's registry variants

    @property
    def label(self):
        n = len(self.sizes)
        size = _fmt_count(self.sizes[0]) if len(set(self.sizes)) == 1 else "mixed"
        return f"{self.rule} {n}x{size} {self.dtype}" if n > 1 else \
            f"{self.rule} {size} {self.dtype}"

    @property
    def elements(self):
        return int(sum(self.sizes))

    def group(self):
        rule = registry.RULES[self.rule]
        return rule.check_group({**rule.defaults, **rule.variants[self.variant]})

    def shape(self, n):
        """A tensor of ``n`` elements: 1-D, or rows of ``ROW_DIM`` for row-wise rules
        (an embedding table; their state is one value per row)."""
        if registry.RULES[self.rule].layout == "rowwise":
            if n % ROW_DIM:
                raise ValueError(f"{self.rule} benchmark tensors are rows of {ROW_DIM}: "
                                 f"{n} elements do not divide into them")
            return (n // ROW_DIM, ROW_DIM)
        return (n,)

    def bytes_per_step(self):
        """Bytes a step must move: read p, g and each used slot; write p and slots
        (a row-wise rule's slots have one value per row)."""
        rule = registry.RULES[self.rule]
        k = sum(rule.uses_slots(self.group()))
        item = np.dtype(self.dtype).itemsize
        if rule.layout == "rowwise":
            return item * (3 * self.elements + 2 * k * (self.elements // ROW_DIM))
        return self.elements * item * (3 + 2 * k)


#: row length of the dense benchmark tensors of row-wise rules
ROW_DIM = 64


def _fmt_count(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div and n % int(div) == 0:
            return f"{n // int(div)}{unit}"
    return str(n)


def _data(case, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(case.shape(n)).astype(case.dtype) for n in case.sizes]
    grads = [(rng.standard_normal(case.shape(n)) * 1e-3).astype(case.dtype)
             for n in case.sizes]
    return params, grads


TORCH_MODES = ("forloop", "foreach", "fused")


def implementation_names(host_backends=None):
    if host_backends is None:
        host_backends = [b for b in backends.available() if b != "cuda"]
    return ([f"fastopt-{b}" for b in host_backends] + ["ceiling"]
            + [f"torch-{m}" for m in TORCH_MODES])


def implementations(case, host_backends=None, only=None):
    """name -> zero-argument callable doing one step, all on private copies of the
    data.  ``only``: build just these names.  torch entries are absent where torch
    is not installed or lacks the rule or mode."""
    rule = registry.RULES[case.rule]
    variant = rule.variants[case.variant]
    out = {}
    for name in implementation_names(host_backends):
        if only is not None and name not in only:
            continue
        if name.startswith("fastopt-"):
            params, grads = _data(case)
            opt = CLASSES[case.rule](params, backend=name[len("fastopt-"):], **variant)
            out[name] = _bind(opt.step, grads)
        elif name == "ceiling":
            out[name] = _ceiling(case)
        else:
            torch = _torch()
            if torch is not None and hasattr(torch.optim, case.rule):
                fn = _torch_step(torch, case, name[len("torch-"):], variant)
                if fn is not None:
                    out[name] = fn
    return out


def _bind(step, grads):
    def run():
        step(grads)
    return run


def _ceiling(case):
    """The no-math kernel over the same streams (a row-wise rule's per-row state,
    1/ROW_DIM of a stream, is left out)."""
    rule = registry.RULES[case.rule]
    uses = rule.uses_slots(case.group())
    if rule.layout == "rowwise":
        uses = (False,) * registry.NSLOTS
    params, grads = _data(case)
    slots = [[np.zeros_like(p) for _ in range(registry.NSLOTS)] for p in params]
    ptrs = np.zeros((len(params), 2 + registry.NSLOTS), dtype=np.int64)
    for t, (p, g, ss) in enumerate(zip(params, grads, slots)):
        ptrs[t, :2] = p.ctypes.data, g.ctypes.data
        ptrs[t, 2:] = [s.ctypes.data if u else p.ctypes.data for s, u in zip(ss, uses)]
    chunks = numba_cpu.make_chunks([p.size for p in params])
    hyper = np.zeros((1, registry.NSCALARS))
    hidx = np.zeros(len(params), dtype=np.int64)
    keep = (params, grads, slots)

    config = Config(rule=CEILING, dtype=np.dtype(case.dtype), uses=tuple(uses))
    driver = numba_cpu._driver(numba_cpu.make_dense_driver, config,
                               case.elements >= numba_cpu.PARALLEL_MIN)

    def run():
        driver(ptrs, chunks, hyper, hidx)
        return keep
    return run


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_step(torch, case, mode, variant):
    params, grads = _data(case)
    tparams = []
    for p, g in zip(params, grads):
        t = torch.from_numpy(p)
        t.grad = torch.from_numpy(g)
        tparams.append(t)
    kwargs = {**registry.torch_defaults(registry.RULES[case.rule]), **variant}
    if mode != "forloop":
        kwargs[mode] = True
    else:
        kwargs["foreach"] = False
    try:
        opt = getattr(torch.optim, case.rule)(tparams, **kwargs)
        opt.step()
    except (RuntimeError, TypeError, ValueError):   # e.g. no fused kernel for this rule
        return None
    return opt.step


@dataclass
class SparseCase:
    """Lazy sparse step on an embedding table: ``lookups`` Zipf(1.2)-distributed row
    indices per step (many duplicates), ``dim`` columns, float32."""
    rule: str
    rows: int
    dim: int = 64
    lookups: int = 16_384
    dtype: str = "float32"
    variant: int = 0

    @property
    def label(self):
        return f"{self.rule} sparse {_fmt_count(self.rows)}x{self.dim} {self.lookups} lookups"

    def gradient(self, seed=0):
        rng = np.random.default_rng(seed)
        idx = np.minimum(rng.zipf(1.2, self.lookups) - 1, self.rows - 1).astype(np.int64)
        vals = rng.standard_normal((self.lookups, self.dim)).astype(self.dtype)
        return idx, vals

    @property
    def elements(self):
        """Elements updated per step (touched rows x dim)."""
        idx, _ = self.gradient()
        return int(np.unique(idx).size) * self.dim

    def bytes_per_step(self):
        """Touched rows of param and state read and written, gradient values read."""
        rule = registry.RULES[self.rule]
        group = rule.check_group({**rule.defaults, **rule.variants[self.variant]})
        k = sum(rule.uses_slots(group))
        item = np.dtype(self.dtype).itemsize
        state = self.elements // self.dim if rule.layout == "rowwise" else self.elements
        return item * (2 * self.elements + 2 * k * state + self.lookups * self.dim)


TORCH_SPARSE = {"Adam": "SparseAdam", "Adagrad": "Adagrad", "SGD": "SGD"}


def sparse_implementations(case, host_backends=None):
    """fastopt backends that take sparse gradients, and torch's sparse optimizer."""
    from .sparse import RowSparse
    rule = registry.RULES[case.rule]
    variant = rule.variants[case.variant]
    idx, vals = case.gradient()
    out = {}
    if host_backends is None:
        host_backends = [b for b in backends.available() if b != "cuda"]
    for name in host_backends:
        if not backends.resolve(name).supports("sparse_lazy"):
            continue
        table = np.random.default_rng(1).standard_normal((case.rows, case.dim)).astype(
            case.dtype)
        opt = CLASSES[case.rule]([table], backend=name, **variant)
        out[f"fastopt-{name}"] = _bind(opt.step, [RowSparse(idx, vals)])
    torch = _torch()
    if torch is not None and case.rule in TORCH_SPARSE:
        table = torch.from_numpy(np.random.default_rng(1).standard_normal(
            (case.rows, case.dim)).astype(case.dtype))
        p = torch.nn.Parameter(table)
        kwargs = dict(lr=1e-3)
        topt = getattr(torch.optim, TORCH_SPARSE[case.rule])([p], **kwargs)
        ti, tv = torch.from_numpy(idx)[None], torch.from_numpy(vals)

        def torch_step():
            p.grad = torch.sparse_coo_tensor(ti, tv, (case.rows, case.dim),
                                             check_invariants=False)
            topt.step()
        out[f"torch-{TORCH_SPARSE[case.rule]}"] = torch_step
    return out


def time_step(fn, min_time=0.3, max_repeats=20):
    """Best seconds per call: a warm-up, then repeats of batches of calls."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(0.02 / one))
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 3 or (spent < min_time and reps < max_repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        dt = time.perf_counter() - t0
        best = min(best, dt / inner)
        spent += dt
        reps += 1
    return best


def measure(case, host_backends=None, min_time=0.3, skip=()):
    """Time every implementation of a case; returns a list of result dicts."""
    impls = (sparse_implementations(case, host_backends) if isinstance(case, SparseCase)
             else implementations(case, host_backends))
    nbytes = case.bytes_per_step()
    times = {name: time_step(fn, min_time) for name, fn in impls.items() if name not in skip}
    ceiling = times.get("ceiling")
    rows = []
    for name, t in times.items():
        rows.append(dict(case=case.label, impl=name, seconds=t,
                         elems_per_s=case.elements / t, gb_per_s=nbytes / t / 1e9,
                         of_ceiling=(ceiling / t) if ceiling else float("nan")))
    return rows


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    return (f"{cpu}, {os.cpu_count()} logical cores, numba {numba.__version__} "
            f"({numba.get_num_threads()} threads), numpy {np.__version__}, "
            f"Python {platform.python_version()}")


def default_cases(quick=False):
    """The table the README shows: every rule on one 10M tensor, and Adam on
    1,000 x 10K and 10 x 100 (per-tensor overhead)."""
    big = 1_000_000 if quick else 10_000_000
    cases = [Case(name, (big,)) for name in registry.RULES]
    cases += [Case("Adam", (10_000,) * (100 if quick else 1000)),
              Case("Adam", (100,) * 10)]
    cases += [SparseCase("Adam", 100_000 if quick else 1_000_000)]
    if not quick:
        cases += [SparseCase("Adam", 4_000_000), SparseCase("Adagrad", 1_000_000),
                  SparseCase("RowWiseAdagrad", 1_000_000)]
    return cases


def format_table(rows):
    """A Markdown table; per case, 'vs best torch' is torch's best time / this one's.
    For sparse cases, elements are the touched ones and there is no ceiling."""
    header = ("| case | implementation | time/step | elements/s | GB/s | of ceiling |"
              " speed-up vs best torch |\n|---|---|---:|---:|---:|---:|---:|")
    lines = [header]
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    for case, rs in by_case.items():
        torch_best = min((r["seconds"] for r in rs if r["impl"].startswith("torch")),
                         default=None)
        for r in rs:
            vs = f"{torch_best / r['seconds']:.2f}x" if torch_best else "n/a"
            lines.append(f"| {case} | {r['impl']} | {_fmt_time(r['seconds'])} | "
                         f"{r['elems_per_s']:.3g} | {r['gb_per_s']:.1f} | "
                         f"{r['of_ceiling']:.2f} | {vs} |")
    return "\n".join(lines)


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms"


def run(cases, host_backends=None, min_time=0.3, out=None, progress=True,
        skip_numpy_above=None):
    """Measure the cases, printing progress to stderr and the table to ``out``
    (default stdout)."""
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is True else progress
    rows = []
    for k, case in enumerate(cases, 1):
        if progress is not None:
            print(f"[{k}/{len(cases)}] {case.label} ...", file=progress, flush=True)
        skip = ()
        if skip_numpy_above is not None and case.elements > skip_numpy_above:
            skip = ("fastopt-numpy",)
        rows.extend(measure(case, host_backends, min_time, skip=skip))
    print(f"Machine: {machine_description()}\n", file=out)
    print(format_table(rows), file=out)
    return rows
