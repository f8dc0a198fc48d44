"""Who is measured: one zero-argument callable per implementation of a case, each on
its own copy of identical data.

Dense cases:

* ``fastopt-<backend>`` for each available host backend (``numpy`` is the reference);
* ``ceiling``: a kernel that reads and writes exactly the bytes the rule moves
  (param, gradient, used state slots) with one add per stream and no other math,
  through the same chunked driver: the memory ceiling of this access pattern,
  measured in the same rounds as the contenders;
* ``torch-forloop``, ``torch-foreach``, ``torch-fused`` where torch is installed and
  has the rule and mode; for LAMB and LARS (not in torch.optim) ``torch-foreach`` is
  the multi-tensor implementation of :mod:`fastopt.benchmark.torch_peers`;
* ``torch-<package>``: a torch-based peer outside torch.optim (:data:`PEERS`:
  bitsandbytes' AdEMAMix, schedulefree's AdamWScheduleFree and SGDScheduleFree, in
  train mode) where that package is installed; it is a torch row (a peer, never
  flagged by ``--compare``).

Sparse cases: the fastopt backends with lazy sparse steps and torch's sparse
optimizer (``SparseAdam``, sparse ``Adagrad``, ``SGD``), each stepping through the
same pool of batches (a fresh batch every step).

Contenders are built in priority order while they fit in memory (70% of what the
machine has available); one that does not fit, or the NumPy reference on a dense
case above :data:`REFERENCE_MAX` elements, is omitted with a reason that the
report prints.
"""

import os

import numpy as np
from numba.extending import register_jitable

from .. import backends
from .. import rules as registry
from ..backends import numba_cpu
from ..backends.base import FMT_COLS, Config
from ..optimizers import CLASSES
from ..planner import fill_fmt
from ..rules import Rule, scalars_type
from . import torch_peers
from ..storage import NATIVE

TORCH_MODES = ("forloop", "foreach", "fused")
TORCH_SPARSE = {"Adam": "SparseAdam", "Adagrad": "Adagrad", "SGD": "SGD"}
#: rule -> (package, module, class): torch-based peers outside torch.optim (benchmark
#: extras, never dependencies), named ``torch-<package>``
PEERS = {"AdEMAMix": ("bitsandbytes", "bitsandbytes.optim", "AdEMAMix"),
         "AdamWScheduleFree": ("schedulefree", "schedulefree", "AdamWScheduleFree"),
         "SGDScheduleFree": ("schedulefree", "schedulefree", "SGDScheduleFree")}
#: the NumPy reference is left out of dense cases above this many elements (seconds
#: per step, and temporaries the size of the tensor)
REFERENCE_MAX = 10_000_000
#: sparse warm-up steps before timing (touched rows and state reach steady state)
SPARSE_WARMUP = 20


@register_jitable
def touch(p, g, s0, s1, s2, c):
    """No-math stand-in for a rule: every stream read, every used stream written
    (one add each, so the compiler cannot drop a store)."""
    return p + g, s0 + g, s1 + g, s2 + g


#: the ceiling kernel's scalars: only the fused fields, all unused
Scalars = scalars_type("CeilingScalars", ())
#: the ceiling as a rule, so that it runs through the same dense driver as every rule
CEILING = Rule(name="ceiling", defaults={}, checks={}, slots=(), uses_slots=lambda group: (),
               Scalars=Scalars, host_scalars=lambda group, step, host, fresh: ({}, host),
               math=touch, reference=None)


@register_jitable
def touch_norms(p, g, s0, s1, s2, c):
    """No-math stand-in for a per-tensor rule's norm pass: every stream it reads is
    summed (so no load is dropped), nothing is written."""
    return p + s0 + s1 + s2, g


#: the norm pass of the ceiling of per-tensor rules (the same norm-pass driver)
CEILING_NORMS = Rule(name="ceiling-norms", defaults={}, checks={}, slots=(),
                     uses_slots=lambda group: (), Scalars=Scalars,
                     host_scalars=lambda group, step, host, fresh: ({}, host), math=touch,
                     reference=None, layout="tensor", norms=touch_norms,
                     tensor_scalars=lambda group, a, b: {})


def host_backends():
    return [b for b in backends.available() if b != "cuda"]


def implementation_names(host=None):
    host = host_backends() if host is None else host
    return ([f"fastopt-{b}" for b in host] + ["ceiling"]
            + [f"torch-{m}" for m in TORCH_MODES]
            + sorted({f"torch-{package}" for package, _, _ in PEERS.values()}))


def available_memory():
    """Bytes the kernel reports available (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Budget:
    def __init__(self, fraction=0.7):
        avail = available_memory()
        self.left = None if avail is None else int(avail * fraction)

    def take(self, nbytes):
        if self.left is None:
            return True
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


def _torch():
    if os.environ.get("FASTOPT_BENCH_NO_TORCH"):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def _priority(names):
    """Build order: fastopt's default backend, torch, the ceiling, the others."""
    first = f"fastopt-{backends.resolve('auto').name}"

    def key(n):
        return (n != first, not n.startswith("torch"), n != "ceiling", n == "fastopt-numpy")
    return sorted(names, key=key)


def implementations(case, host=None, only=None):
    """``(contenders, omitted)``: name -> callable doing one step, and name -> why
    it was left out.  ``only``: build just these names."""
    if case.kind == "sparse":
        return sparse_implementations(case, host, only)
    rule = registry.RULES[case.rule]
    variant = rule.variants[case.variant]
    out, omitted = {}, {}
    budget = _Budget()
    torch = None
    for name in _priority(implementation_names(host)):
        if only is not None and name not in only:
            continue
        if name.startswith("torch-"):
            torch = torch or _torch()
            if torch is None:
                continue
            if case.rule in torch_peers.PEERS:      # not in torch.optim: a foreach peer
                if name != "torch-foreach":
                    continue
            elif name[len("torch-"):] in TORCH_MODES:
                if not hasattr(torch.optim, case.rule):
                    continue
            elif name != f"torch-{PEERS.get(case.rule, ('',))[0]}":
                continue
        if name == "fastopt-numpy" and case.elements > REFERENCE_MAX:
            omitted[name] = f"the reference is not timed above {REFERENCE_MAX:,} elements"
            continue
        if not budget.take(case.memory()):
            omitted[name] = "does not fit in memory beside the others"
            continue
        if name.startswith("fastopt-"):
            params, grads = case.data()
            opt = CLASSES[case.rule](params, backend=name[len("fastopt-"):], **variant)
            out[name] = _bind(opt.step, grads)
        elif name == "ceiling":
            out[name] = _ceiling(case)
        elif name[len("torch-"):] in TORCH_MODES:
            fn = _torch_step(torch, case, name[len("torch-"):], variant)
            if fn is not None:
                out[name] = fn
        else:
            fn = _peer_step(torch, case, variant)
            if fn is not None:
                out[name] = fn
    return out, omitted


def _peer_step(torch, case, variant):
    """One step of the rule's torch-based peer (:data:`PEERS`), or None when its
    package is not installed or refuses the configuration."""
    import importlib
    _, module, cls = PEERS[case.rule]
    try:
        peer = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
    params, grads = case.data()
    tparams = []
    for p, g in zip(params, grads):
        t = torch.from_numpy(p)
        t.grad = torch.from_numpy(g)
        tparams.append(t)
    kwargs = {**registry.torch_defaults(registry.RULES[case.rule]), **variant}
    try:
        opt = peer(tparams, **kwargs)
        if hasattr(opt, "train"):      # schedule-free: steps only in train mode
            opt.train()
        opt.step()
    except (RuntimeError, TypeError, ValueError):
        return None
    return opt.step


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
    if rule.factored:        # 1-D: the update pass reads variance (its one slot there)
        uses = tuple(n in rule.slots_of(case.shape(1)) for n in
                     rule.slots + (None,) * (registry.NSLOTS - len(rule.slots)))
    params, grads = case.data()
    slots = [[np.zeros_like(p) if u else None for u in uses] for p in params]
    ptrs = np.zeros((len(params), 2 + registry.NSLOTS), dtype=np.int64)
    for t, (p, g, ss) in enumerate(zip(params, grads, slots)):
        ptrs[t, :2] = p.ctypes.data, g.ctypes.data
        ptrs[t, 2:] = [s.ctypes.data if s is not None else p.ctypes.data for s in ss]
    fmt = np.zeros((len(params), FMT_COLS), dtype=np.int64)
    blocks = [fill_fmt(fmt[t], p, None, NATIVE, backends.resolve("numba"))
              for t, p in enumerate(params)]
    chunks = numba_cpu.stored_chunks(blocks, numba_cpu.CHUNK)
    hyper = np.zeros((1, registry.NSCALARS))
    hidx = np.zeros(len(params), dtype=np.int64)
    keep = (params, grads, slots)

    config = Config(rule=CEILING, dtype=np.dtype(case.dtype), uses=tuple(uses))
    parallel = case.elements >= numba_cpu.PARALLEL_MIN
    driver = numba_cpu._driver(numba_cpu.make_stored_dense_driver, config, parallel)
    if rule.per_tensor:      # the norm pass first: p, g and the slots it reads
        from ..backends import numba_norms
        ncfg = Config(rule=CEILING_NORMS, dtype=np.dtype(case.dtype),
                      uses=tuple(k < rule.norm_reads for k in range(registry.NSLOTS)))
        norms = numba_norms.make_norms_driver(ncfg, parallel)
        elements = numba_cpu.make_chunks([p.size for p in params])
        out = np.zeros((len(params), 2))

        def run():
            norms(ptrs, elements, hyper, hidx, out)
            driver(ptrs, fmt, chunks, hyper, hidx)
            return keep
        return run

    def run():
        driver(ptrs, fmt, chunks, hyper, hidx)
        return keep
    return run


def _torch_step(torch, case, mode, variant):
    params, grads = case.data()
    if case.rule in torch_peers.PEERS:
        rule = registry.RULES[case.rule]
        return torch_peers.PEERS[case.rule](torch, params, grads,
                                            rule.check_group({**rule.defaults, **variant}))
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


def sparse_implementations(case, host=None, only=None):
    """fastopt backends with lazy sparse steps and torch's sparse optimizer, each
    cycling through the case's pool of batches; warmed up by
    :data:`SPARSE_WARMUP` steps.  Returns ``(contenders, omitted)``."""
    from ..sparse import RowSparse
    rule = registry.RULES[case.rule]
    variant = rule.variants[case.variant]
    pool = case.batches()
    host = host_backends() if host is None else host
    names = [f"fastopt-{b}" for b in host if backends.resolve(b).supports("sparse_lazy")]
    torch = _torch()
    if torch is not None and case.rule in TORCH_SPARSE:
        names.append(f"torch-{TORCH_SPARSE[case.rule]}")
    out, omitted = {}, {}
    budget = _Budget()
    for name in _priority(names):
        if only is not None and name not in only:
            continue
        if not budget.take(case.memory()):
            omitted[name] = (f"does not fit in memory beside the others "
                             f"({case.memory() / 2 ** 30:.1f} GiB each)")
            continue
        if name.startswith("fastopt-"):
            opt = CLASSES[case.rule]([case.table()], backend=name[len("fastopt-"):],
                                     **variant)
            grads = [[RowSparse(i, v)] for i, v in pool]
            out[name] = _cycle(opt.step, grads)
        else:
            p = torch.nn.Parameter(torch.from_numpy(case.table()))
            topt = getattr(torch.optim, TORCH_SPARSE[case.rule])([p], lr=1e-3)
            tgrads = [torch.sparse_coo_tensor(torch.from_numpy(i)[None], torch.from_numpy(v),
                                              (case.rows, case.dim), check_invariants=False)
                      for i, v in pool]

            def torch_step(p=p, topt=topt, tgrads=tgrads, k=[0]):
                p.grad = tgrads[k[0] % len(tgrads)]
                k[0] += 1
                topt.step()
            out[name] = torch_step
        for _ in range(SPARSE_WARMUP):
            out[name]()
    return out, omitted


def _cycle(step, grads):
    k = [0]

    def run():
        step(grads[k[0] % len(grads)])
        k[0] += 1
    return run
