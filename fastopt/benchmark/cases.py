"""What is measured: dense cases (tensor sizes) and sparse cases (an embedding table
fed a fresh batch of ids every step), with the bytes each step must move.

Dense: :class:`Case` is a rule, a list of tensor sizes and a dtype.  A step reads
the parameter, the gradient and every used state slot and writes the parameter and
the slots: ``elements * itemsize * (3 + 2 * slots)`` bytes (row-wise rules keep one
state value per row of :data:`ROW_DIM`).

Sparse: :class:`SparseCase` is a lazy step on a ``rows x dim`` table with a pool of
pre-generated batches of ``lookups`` ids (Zipf(1.2) or uniform), one batch per
step, cycled, so each step sees fresh indices and fresh gradient values as in
training (a repeated gradient would keep its rows in cache).  Zipf ids are hashed
over the table (``(k * 2654435761) mod rows``, a bijection), so hot rows are spread
as in a hashed embedding rather than packed at the start.  A step must read and
write the touched rows of the parameter and the state and read the gradient
values: ``itemsize * (2 * touched * dim + 2 * slots * touched * state_dim +
lookups * dim)`` bytes (the ids and the coalescing plan are left out), averaged
over the pool.
"""

from dataclasses import dataclass, field

import numpy as np

from .. import rules as registry

#: row length of the dense benchmark tensors of row-wise rules
ROW_DIM = 64
#: the multiplier that spreads Zipf ids over the table (a prime: a bijection mod rows)
HASH = 2654435761


def fmt_count(n):
    for unit, div in (("G", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def _group(rule_name, variant):
    rule = registry.RULES[rule_name]
    return rule.check_group({**rule.defaults, **rule.variants[variant]})


@dataclass
class Case:
    """A dense step: ``rule`` on tensors of ``sizes`` elements."""
    rule: str
    sizes: tuple
    dtype: str = "float32"
    variant: int = 0      # index into the rule's registry variants

    kind = "dense"

    @property
    def label(self):
        n = len(self.sizes)
        size = fmt_count(self.sizes[0]) if len(set(self.sizes)) == 1 else "mixed"
        return f"{self.rule} {n}x{size} {self.dtype}" if n > 1 else \
            f"{self.rule} {size} {self.dtype}"

    @property
    def elements(self):
        return int(sum(self.sizes))

    def group(self):
        return _group(self.rule, self.variant)

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
        (a row-wise rule's slots have one value per row; a per-tensor rule's norm
        pass first reads p, g and ``rule.norm_reads`` slots)."""
        rule = registry.RULES[self.rule]
        k = sum(rule.uses_slots(self.group()))
        item = np.dtype(self.dtype).itemsize
        if rule.layout == "rowwise":
            return item * (3 * self.elements + 2 * k * (self.elements // ROW_DIM))
        if rule.per_tensor:      # the norm pass reads p, g and its slots first
            return self.elements * item * (3 + 2 * k + 2 + rule.norm_reads)
        if rule.factored:        # 1-D: its vector path (bench/adafactor_bench.py: matrices)
            # sums pass: p, g, variance read, variance written; RMS pass: g, variance;
            # update pass: p, g, variance read, p written
            return self.elements * item * 10
        return self.elements * item * (3 + 2 * k)

    def memory(self):
        """Bytes one contender holds (param, grad, state)."""
        rule = registry.RULES[self.rule]
        k = sum(rule.uses_slots(self.group()))
        if rule.factored:        # 1-D: one slot (variance) of the parameter's shape
            k = len(rule.slots_of(self.shape(self.sizes[0])))
        state = self.elements // ROW_DIM if rule.layout == "rowwise" else self.elements
        return np.dtype(self.dtype).itemsize * (2 * self.elements + k * state)

    def data(self, seed=0):
        """Parameters and gradients (identical for every contender)."""
        rng = np.random.default_rng(seed)
        params = [rng.standard_normal(self.shape(n)).astype(self.dtype) for n in self.sizes]
        grads = [(rng.standard_normal(self.shape(n)) * 1e-3).astype(self.dtype)
                 for n in self.sizes]
        return params, grads


@dataclass
class SparseCase:
    """A lazy sparse step on a ``rows x dim`` table, a fresh batch of ``lookups``
    ids (``dist``: ``"zipf"`` (1.2) or ``"uniform"``) every step."""
    rule: str
    rows: int
    dim: int = 64
    lookups: int = 16_384
    dist: str = "zipf"
    dtype: str = "float32"
    variant: int = 0
    pool: int = 16                       # batches generated and cycled
    _batches: list = field(default=None, repr=False, compare=False)

    kind = "sparse"

    @property
    def label(self):
        return (f"{self.rule} sparse {fmt_count(self.rows)}x{self.dim} "
                f"{self.lookups // 1024}K {self.dist}")

    def group(self):
        return _group(self.rule, self.variant)

    def batches(self):
        """The pool: ``[(ids int64, values (lookups, dim))]``, generated once."""
        if self._batches is None:
            rng = np.random.default_rng(12345)
            out = []
            for _ in range(self.pool):
                if self.dist == "zipf":
                    k = (rng.zipf(1.2, self.lookups) - 1) % self.rows
                    ids = (k.astype(np.uint64) * np.uint64(HASH)) % np.uint64(self.rows)
                elif self.dist == "uniform":
                    ids = rng.integers(0, self.rows, self.lookups)
                else:
                    raise ValueError(f"unknown id distribution {self.dist!r}")
                vals = rng.standard_normal((self.lookups, self.dim)).astype(self.dtype)
                out.append((ids.astype(np.int64), vals))
            self._batches = out
        return self._batches

    @property
    def touched(self):
        """Mean number of distinct rows per batch."""
        return float(np.mean([np.unique(i).size for i, _ in self.batches()]))

    @property
    def elements(self):
        """Elements updated per step (touched rows x dim), mean over the pool."""
        return self.touched * self.dim

    def bytes_per_step(self):
        """Touched rows of param and state read and written, gradient values read."""
        rule = registry.RULES[self.rule]
        k = sum(rule.uses_slots(self.group()))
        item = np.dtype(self.dtype).itemsize
        state = self.touched * (1 if rule.layout == "rowwise" else self.dim)
        return item * (2 * self.elements + 2 * k * state + self.lookups * self.dim)

    def memory(self):
        """Bytes one contender holds (table and state)."""
        rule = registry.RULES[self.rule]
        k = sum(rule.uses_slots(self.group()))
        per_row = self.dim * (1 + (0 if rule.layout == "rowwise" else k)) + \
            (k if rule.layout == "rowwise" else 0)
        return self.rows * per_row * np.dtype(self.dtype).itemsize

    def table(self, seed=1):
        return np.random.default_rng(seed).standard_normal(
            (self.rows, self.dim), dtype=np.float32).astype(self.dtype, copy=False)


def default_cases(quick=False):
    """The table the README shows.

    * every rule on one 10M tensor (quick: Adam, AdamW, SGD on 1M);
    * Adam on one tensor of 1e3 .. 1e8 elements (quick: up to 1e7);
    * Adam on a fixed total split from many small to few large tensors
      (10M as 10,000 x 1K .. 10 x 1M; quick: 1M as 1,000 x 1K .. 10 x 100K);
    * sparse lazy Adam on 1M, 4M and 16M x 64 tables with Zipf ids, 1M with uniform
      ids, sparse Adagrad and row-wise Adagrad on 1M (quick: Adam on 1M Zipf and
      uniform, Adagrad on 1M).
    """
    cases = []
    if quick:
        cases += [Case(r, (1_000_000,)) for r in ("Adam", "AdamW", "SGD")]
        cases += [Case("Adam", (n,)) for n in (1_000, 10_000, 100_000, 10_000_000)]
        cases += [Case("Adam", (n,) * (1_000_000 // n)) for n in (1_000, 10_000, 100_000)]
        cases += [SparseCase("Adam", 1_000_000), SparseCase("Adam", 1_000_000, dist="uniform"),
                  SparseCase("Adagrad", 1_000_000)]
        return cases
    # (matrix rules, Muon, are compute-bound: bench/muon_bench.py measures them
    # against the GEMM rate, not the memory bandwidth)
    cases += [Case(r, (10_000_000,)) for r, rule in registry.RULES.items()
              if rule.matrix is None]
    cases += [Case("Adam", (10 ** e,)) for e in (3, 4, 5, 6, 8)]
    cases += [Case("Adam", (n,) * (10_000_000 // n)) for n in (1_000, 10_000, 100_000, 1_000_000)]
    cases += [SparseCase("Adam", r) for r in (1_000_000, 4_000_000, 16_000_000)]
    cases += [SparseCase("Adam", 1_000_000, dist="uniform"), SparseCase("Adagrad", 1_000_000),
              SparseCase("RowWiseAdagrad", 1_000_000)]
    return cases
