"""The matrix phase of the matrix rules (``Rule(layout="matrix")``: Muon).

A matrix rule's step is three phases over each parameter ``[..., M, N]``:

1. element phase 1, ``rule.phase1(g, s0, c) -> (s0, u)`` (Muon: the momentum buffer
   and the direction), run on whole arrays;
2. the matrix phase, ``rule.matrix(u, group, dtype) -> o`` (Muon: Newton-Schulz per
   trailing matrix, through BLAS), run by the backend (``Backend.run_matrix``; the
   CPU backends share :mod:`fastopt.backends.matrix_cpu`);
3. element phase 2: the usual dense drivers run ``rule.math`` over the bucket, with
   ``o`` in the gradient's place (its address in the bucket's gradient column).

Phases 1 and 2 run in the step after every check (nothing here fails on user input),
so a refused step changes nothing.  The engine calls :func:`run` between filling a
bucket and launching it (``Optimizer._step_dense``, ``fastopt.functional``); the
NumPy reference backend runs the rule's whole ``reference`` instead.
"""


def run(backend, works, groups):
    """Phases 1 and 2 of every bucket in ``works`` (``groups[bucket][t]``: the param
    group of its tensor ``t``); afterwards each bucket's gradient column points at the
    matrix phase's output, which the bucket's ``grads`` keeps alive."""
    for work, gs in zip(works, groups):
        backend.run_matrix(work, gs)
