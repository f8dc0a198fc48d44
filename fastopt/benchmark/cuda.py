"""GPU throughput of the CUDA backend beside its peers, in one run.

For a :class:`fastopt.benchmark.Case` (rule, tensor sizes, dtype) this module builds
one zero-argument callable per implementation, each on its own device data, each
ending with a device synchronize (so a timed call is a finished step):

* ``fastopt-cuda``: the optimizer class with ``backend="cuda"``, device gradients;
* ``ceiling-cuda``: the same multi-tensor kernel and launch with the rule math
  replaced by :func:`fastopt.benchmark.touch` (every used stream read and written,
  one add each): the device's measured copy bandwidth for this access pattern,
  the denominator of the "of ceiling" column;
* ``torch-foreach``, ``torch-fused``: ``torch.optim`` on CUDA tensors (when torch
  has CUDA and the rule and mode);
* ``cupy``: a CuPy ``ElementwiseKernel`` per tensor (Adam, AdamW, SGD with momentum;
  when CuPy is installed).

:func:`benchmark_table` prints the same Markdown table as ``python -m fastopt bench``
(time/step, elements/s, GB/s, fraction of ``ceiling-cuda``, speed-up vs the best
torch); ``bench/test_cuda_throughput.py`` times the same callables with
pytest-benchmark.  Nothing here asserts anything about absolute time.
"""

import gc
import sys

import numpy as np

from .. import backends, benchmark
from .. import rules as registry
from ..backends import cuda as cb
from ..backends.base import Config, DenseWork
from ..optimizers import CLASSES
from .cases import Case

IMPLEMENTATIONS = ("fastopt-cuda", "ceiling-cuda", "torch-foreach", "torch-fused", "cupy")


def default_cases(quick=False):
    """Adam, AdamW and SGD (momentum) float32 on one 100M tensor and on 1,000 x 100K
    (quick: 10M and 100 x 100K)."""
    big, many = (10_000_000, 100) if quick else (100_000_000, 1000)
    cases = []
    for rule, variant in (("Adam", 0), ("AdamW", 0), ("SGD", 1)):
        cases += [Case(rule, (big,), variant=variant),
                  Case(rule, (100_000,) * many, variant=variant)]
    return cases


def _data(case, seed=0):
    return case.data(seed)


def _fastopt(case):
    cuda = cb._load()
    rule = registry.RULES[case.rule]
    params, grads = _data(case)
    dparams = [cuda.to_device(p) for p in params]
    dgrads = [cuda.to_device(g) for g in grads]
    opt = CLASSES[case.rule](dparams, backend="cuda", **rule.variants[case.variant])

    def run():
        opt.step(dgrads)
        cuda.synchronize()
    return run


def _ceiling(case):
    """The dense multi-tensor kernel with the math replaced by
    :func:`fastopt.benchmark.touch` (the rule :data:`fastopt.benchmark.CEILING`):
    same pointer table, chunks and launch, the same bytes moved, no arithmetic.  Its
    time is the device's copy ceiling for the case."""
    cuda = cb._load()
    rule = registry.RULES[case.rule]
    uses = tuple(bool(u) for u in rule.uses_slots(case.group()))
    if rule.layout == "rowwise":       # one value per row: left out, as on the CPU
        uses = (False,) * registry.NSLOTS
    params, grads = _data(case)
    dparams = [cuda.to_device(p) for p in params]
    dgrads = [cuda.to_device(g) for g in grads]
    slots = [[cuda.to_device(np.zeros_like(p)) if u else None for u in uses] for p in params]
    ptrs = np.zeros((len(params), 2 + registry.NSLOTS), dtype=np.int64)
    for t, (p, g, ss) in enumerate(zip(dparams, dgrads, slots)):
        ptrs[t, :2] = cb._address(p), cb._address(g)
        ptrs[t, 2:] = [cb._address(s) if s is not None else ptrs[t, 0] for s in ss]
    work = DenseWork(config=Config(rule=benchmark.CEILING, dtype=np.dtype(case.dtype),
                                   uses=uses),
                     index=list(range(len(params))), params=dparams, grads=dgrads,
                     slots=slots, ptrs=ptrs, hyper=np.zeros((1, registry.NSCALARS)),
                     hidx=np.zeros(len(params), dtype=np.int64), nelem=case.elements)
    backend = cb.register_backend() or cb.CudaBackend()

    def run():
        backend.run_dense(work)
        cuda.synchronize()
    return run


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _torch(case, mode):
    torch = _torch_cuda()
    if torch is None or not hasattr(torch.optim, case.rule):
        return None
    params, grads = _data(case)
    tparams = []
    for p, g in zip(params, grads):
        t = torch.from_numpy(p).cuda()
        t.grad = torch.from_numpy(g).cuda()
        tparams.append(t)
    rule = registry.RULES[case.rule]
    kwargs = {**registry.torch_defaults(rule), **rule.variants[case.variant], mode: True}
    try:
        opt = getattr(torch.optim, case.rule)(tparams, **kwargs)
        opt.step()
    except (RuntimeError, TypeError, ValueError):     # no such mode for this rule
        return None
    torch.cuda.synchronize()

    def run():
        opt.step()
        torch.cuda.synchronize()
    return run


_CUPY_SRC = {
    "Adam": ("T g, T ss, T b1, T omb1, T b2, T omb2, T eps, T rbc2, T decay", "T p, T m, T v",
             "m = b1 * m + omb1 * g; v = b2 * v + omb2 * g * g; "
             "p = p * decay - ss * (m / (sqrt(v) * rbc2 + eps));"),
    "SGD": ("T g, T lr, T mom, T omd", "T p, T buf",
            "buf = mom * buf + omd * g; p = p - lr * buf;"),
}


#: the rule's named scalars each CuPy kernel takes, in its argument order
_CUPY_SCALARS = {
    "Adam": ("step_size", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps",
             "rsqrt_bc2", "decay"),
    "SGD": ("lr", "momentum", "one_minus_dampening"),
}


def _cupy(case):
    try:
        import cupy as cp
    except ImportError:
        return None
    rule = registry.RULES[case.rule]
    group = case.group()
    uses = rule.uses_slots(group)
    kind = {"Adam": "Adam", "AdamW": "Adam", "SGD": "SGD"}.get(case.rule)
    if kind is None:
        return None
    if kind == "Adam" and (group["amsgrad"] or group["maximize"]
                           or (case.rule == "Adam" and group["weight_decay"])):
        return None
    if kind == "SGD" and (not uses[0] or group["nesterov"] or group["maximize"]
                          or group["weight_decay"]):
        return None
    kernel = cp.ElementwiseKernel(*_CUPY_SRC[kind], name=f"fastopt_bench_{kind.lower()}")
    params, grads = _data(case)
    cparams = [cp.asarray(p) for p in params]
    cgrads = [cp.asarray(g) for g in grads]
    state = [[cp.zeros_like(p) for u in uses if u] for p in cparams]
    dt = np.dtype(case.dtype).type
    step = [0]
    host = rule.host_init(group)

    names = _CUPY_SCALARS[kind]

    def run():
        step[0] += 1
        row, _ = rule.row(group, step[0], host, ())
        c = dict(zip(rule.Scalars._fields, row))
        args = [dt(c[n]) for n in names]
        for p, g, st in zip(cparams, cgrads, state):
            kernel(g, *args, p, *st)
        cp.cuda.Device().synchronize()
    return run


def implementation(case, name):
    """A zero-argument callable doing one synchronized step, or None where the
    implementation is not available (no torch CUDA, no CuPy, no such mode)."""
    if name == "fastopt-cuda":
        return _fastopt(case)
    if name == "ceiling-cuda":
        return _ceiling(case)
    if name.startswith("torch-"):
        return _torch(case, name[len("torch-"):])
    if name == "cupy":
        return _cupy(case)
    raise ValueError(f"unknown implementation {name!r}; known: {IMPLEMENTATIONS}")


def measure(case, profile="full", names=IMPLEMENTATIONS):
    """Time the implementations in interleaved rounds (as on the CPU: see
    :mod:`fastopt.benchmark.timing`); returns result rows like
    :func:`fastopt.benchmark.measure` (the bound column uses no host bandwidth:
    ``of ceiling`` against ``ceiling-cuda`` is the device's figure)."""
    fns = {}
    for name in names:
        fn = implementation(case, name)
        if fn is not None:
            fns[name] = fn
    settings = benchmark.PROFILES[profile] if isinstance(profile, str) else profile
    stats = benchmark.time_interleaved(fns, **settings)
    if "ceiling-cuda" in stats:
        stats["ceiling"] = stats.pop("ceiling-cuda")
    del fns
    gc.collect()
    rows = benchmark.report.build_rows(case, stats, None, 0)
    for r in rows:
        if r["impl"] == "ceiling":
            r["impl"] = "ceiling-cuda"
    return rows


def device_description():
    cuda = cb._load()
    import numba_cuda
    if cb._SIM:
        gpu = "CUDA simulator (timings mean nothing)"
    else:
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        gpu = f"{name}, {dev.MULTIPROCESSOR_COUNT} SMs, compute capability {dev.compute_capability}"
    return (f"{gpu}; numba-cuda {numba_cuda.__version__}, block size {cb.BLOCK_SIZE}, "
            f"chunks of {cb.CHUNK} elements, one launch per bucket")


def benchmark_table(quick=False, rules=None, cases=None, out=None, progress=True,
                    profile=None):
    """Measure the CUDA cases and print ``Machine: ...`` and the Markdown table to
    ``out`` (default stdout), progress to stderr.  ``rules``: keep only these rule
    names.  ``profile``: timing settings (default: the CPU bench's).  Returns the
    result rows.  Needs the CUDA backend (a GPU)."""
    if cb.register_backend() is None:
        raise RuntimeError("the CUDA backend is not available: "
                           + backends._UNAVAILABLE.get("cuda", "unknown reason"))
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is True else progress
    cases = default_cases(quick) if cases is None else list(cases)
    if rules:
        cases = [c for c in cases if c.rule in rules]
    rows = []
    for k, case in enumerate(cases, 1):
        if progress:
            print(f"[{k}/{len(cases)}] {case.label} (cuda) ...", file=progress, flush=True)
        rows.extend(measure(case, profile or ("quick" if quick else "full")))
    result = dict(machine=device_description(), bandwidth=None, llc=0, rows=rows,
                  method="interleaved rounds on the device (see fastopt.benchmark.timing)")
    print(benchmark.report.markdown(result), file=out)
    return rows
