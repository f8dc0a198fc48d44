"""What is reported: result rows with their flags, and the four outputs (text,
Markdown, JSON, a chart), plus the comparison against a saved run.

A row is one contender of one case: ``best`` and ``median`` seconds per step and
the ``spread`` of its interleaved samples; GB/s (the case's bytes over the median);
``of_bound``, the fraction of the memory-bandwidth bound (the bytes at the run's
fastest STREAM-like bandwidth over the median); ``of_ceiling`` (dense cases), the ceiling
kernel's median over this one's; ``vs_torch``, the best torch contender's median
over this one's.

Flags, printed in the table instead of being reported as results:

* ``ABOVE-CEILING``: faster than its own ceiling kernel by more than 5% (one of
  the two timings is wrong, or the ceiling is not one);
* ``ABOVE-BOUND``: faster than the bandwidth bound by more than 5% though its data
  does not fit in the last-level cache;
* ``NOISY``: a spread above 10%: the machine was disturbed during the rounds;
* ``cache``: (a note, not an error) the case's data fits in the last-level cache,
  so the memory bound does not apply.
"""

import json
import math

import numpy as np

CEILING_SLACK = 1.05
BOUND_SLACK = 1.05
NOISY = 0.10
#: --compare: a change smaller than this (normalized and raw) is never flagged, however
#: significant: two runs of the same code on the 2-core VM moved fastopt's own rows by
#: up to 15% (a run-level effect that the within-run rank test cannot see)
REGRESSION = 0.20
#: --compare: the family-wise significance level; each row's rank test is held to
#: ``ALPHA / rows compared`` (Bonferroni), so two runs of the same code flag a row
#: with probability at most ALPHA in all
ALPHA = 0.05
#: --compare: a case whose reference has a wider spread than this in either run (the
#: machine was disturbed during its rounds beyond what normalizing can undo) is
#: listed but not tested
REFERENCE_NOISY = 0.5
#: --compare: the contender a case's rows are normalized by, the first present in
#: both runs (code that neither run changes: the ceiling kernel, then torch)
REFERENCES = ("ceiling", "torch-fused", "torch-foreach", "torch-forloop")


def build_rows(case, stats, bandwidth, llc, omitted=None):
    """Result rows of one case from ``{name: Stats}``."""
    nbytes = float(case.bytes_per_step())
    bound = nbytes / (bandwidth.get("bound", bandwidth["triad"]) * 1e9) if bandwidth \
        else float("nan")
    ceiling = stats.get("ceiling")
    torch = [s.median for n, s in stats.items() if n.startswith("torch")]
    torch_best = min(torch) if torch else None
    in_cache = bool(llc) and case.memory() <= llc
    rows = []
    for name, s in stats.items():
        of_ceiling = ceiling.median / s.median if ceiling is not None else None
        of_bound = bound / s.median
        flags = []
        if of_ceiling is not None and name != "ceiling" and of_ceiling > CEILING_SLACK:
            flags.append("ABOVE-CEILING")
        if in_cache:
            flags.append("cache")
        elif of_bound > BOUND_SLACK:
            flags.append("ABOVE-BOUND")
        if s.spread > NOISY:
            flags.append("NOISY")
        rows.append(dict(case=case.label, kind=case.kind, rule=case.rule, impl=name,
                         best_s=s.best, median_s=s.median, spread=s.spread,
                         samples=s.samples, calls_per_sample=s.calls,
                         samples_s=list(s.times),
                         elements=float(case.elements), bytes=nbytes,
                         gb_per_s=nbytes / s.median / 1e9, of_bound=of_bound,
                         of_ceiling=of_ceiling,
                         vs_torch=(torch_best / s.median) if torch_best else None,
                         flags=flags))
    for name, why in (omitted or {}).items():
        rows.append(dict(case=case.label, kind=case.kind, rule=case.rule, impl=name,
                         omitted=why))
    return rows


def _fmt_time(s):
    if s is None or not math.isfinite(s):
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(x, spec, suffix=""):
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        f"{x:{spec}}{suffix}"


COLUMNS = ("case", "implementation", "median", "best", "spread", "GB/s", "of bound",
           "of ceiling", "vs torch", "flags")


def table_cells(rows):
    out = []
    for r in rows:
        if "omitted" in r:
            out.append((r["case"], r["impl"], "", "", "", "", "", "", "",
                        f"omitted: {r['omitted']}"))
            continue
        out.append((r["case"], r["impl"], _fmt_time(r["median_s"]), _fmt_time(r["best_s"]),
                    _fmt(100 * r["spread"], ".0f", "%"), _fmt(r["gb_per_s"], ".1f"),
                    _fmt(r["of_bound"], ".2f"), _fmt(r["of_ceiling"], ".2f"),
                    _fmt(r["vs_torch"], ".2f", "x"), " ".join(r["flags"])))
    return out


def header(result):
    bw = result.get("bandwidth") or {}
    lines = [f"Machine: {result['machine']}"]
    if bw:
        lines.append(f"Memory bandwidth (STREAM-like, {bw['threads']} threads, best of "
                     f"{bw['repeats']}): copy {bw['copy']:.1f} GB/s, triad "
                     f"{bw['triad']:.1f} GB/s, in-place update {bw['update']:.1f} GB/s "
                     f"(the bound uses the fastest); last-level cache "
                     f"{result.get('llc', 0) / 2 ** 20:.0f} MiB")
    lines.append(f"Method: {result['method']}")
    return lines


def markdown(result):
    """The README table: header lines, then one Markdown table."""
    lines = [line + "  " for line in header(result)] + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|---|---|" + "---:|" * 7 + "---|")
    for cells in table_cells(result["rows"]):
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text(result):
    """A fixed-width table for a terminal."""
    cells = [COLUMNS] + table_cells(result["rows"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = header(result) + [""]
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i in (0, 1, 9) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


def load_json(path):
    with open(path) as f:
        result = json.load(f)
    if "rows" not in result or "machine" not in result:
        raise ValueError(f"{path}: not a fastopt bench --json record")
    return result


def _reference(case, old_rows, new_rows):
    """The name of the contender case ``case`` is normalized by (present in both
    runs), or None."""
    both = {i for (c, i) in old_rows if c == case} & {i for (c, i) in new_rows if c == case}
    for name in REFERENCES:
        if name in both:
            return name
    torch = sorted(i for i in both if i.startswith("torch"))
    return torch[0] if torch else None


def _normalized(row, ref):
    """The row's samples over the reference's sample of the same round (paired by
    index), or, for records without samples, the ratio of medians alone."""
    a, b = row.get("samples_s") or [], ref.get("samples_s") or []
    if a and len(a) == len(b):
        return np.asarray(a, np.float64) / np.asarray(b, np.float64)
    return np.array([row["median_s"] / ref["median_s"]])


def _one_sided_p(new, old):
    """p of the rank test (Mann-Whitney U) that ``new`` tends to be larger than
    ``old`` (None when either side has fewer than 3 samples)."""
    if len(new) < 3 or len(old) < 3:
        return None
    from scipy.stats import mannwhitneyu
    return float(mannwhitneyu(new, old, alternative="greater").pvalue)


def compare(old, new):
    """``(lines, regressions)``: a Markdown table of every (case, implementation)
    present in both records, and the rows that regressed.

    A machine that slowed down between two runs slows every contender alike, so
    each row is first normalized by a reference measured in the same rounds of
    the same run (:data:`REFERENCES`: the ceiling kernel, else torch; sample k over
    the reference's sample k).  The change is the ratio of the normalized medians
    (new over old).  A row is flagged ``REGRESSION`` (``faster``) only when that
    ratio *and* the raw ratio of medians are beyond ``1 +- REGRESSION`` the same way
    (a reference that moved on its own, as torch's do from run to run, then cannot
    make a row look changed) *and* a one-sided Mann-Whitney U test of the normalized
    samples gives ``p < ALPHA / N`` over the ``N`` rows compared (Bonferroni).
    torch's rows are peers, listed but never tested: their code is not what two
    fastopt records compare.  A case whose reference's spread exceeds :data:`REFERENCE_NOISY`
    in either run is listed untested.  Records without per-sample times (older ones) are compared by
    normalized medians and never flagged.  The reference's own raw change is
    listed as the machine's drift."""
    old_rows = {(r["case"], r["impl"]): r for r in old["rows"] if "omitted" not in r}
    new_rows = {(r["case"], r["impl"]): r for r in new["rows"] if "omitted" not in r}
    pairs = [(k, old_rows[k], r) for k, r in new_rows.items() if k in old_rows]
    refs = {}
    for (case, _), _, _ in pairs:
        if case not in refs:
            refs[case] = _reference(case, old_rows, new_rows)
    tested = [k for k, _, _ in pairs if refs[k[0]] is not None and refs[k[0]] != k[1]
              and not k[1].startswith("torch")]
    level = ALPHA / max(1, len(tested))
    lines = [f"Old: {old['machine']} ({old.get('started', '?')})",
             f"New: {new['machine']} ({new.get('started', '?')})",
             f"Each row is normalized by a reference timed in the same rounds (the ceiling "
             f"kernel, else torch); flagged when the normalized and the raw change are "
             f"both beyond {100 * REGRESSION:.0f}% and a one-sided Mann-Whitney U test "
             f"gives p < {ALPHA:g}/{len(tested)} = {level:.2g}; torch rows are peers, "
             f"not tested.", "",
             "| case | implementation | reference | old median | new median | raw new/old "
             "| normalized new/old | p | |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    regressions = []
    drift = []
    for (case, impl), o, r in pairs:
        ref = refs[case]
        raw = r["median_s"] / o["median_s"]
        cells = [case, impl, ref or "none", _fmt_time(o["median_s"]), _fmt_time(r["median_s"]),
                 f"{raw:.2f}"]
        if ref is None or ref == impl:
            if ref == impl:
                drift.append(raw)
            lines.append("| " + " | ".join(cells + ["", "", "reference" if ref else
                                                    "no reference: not compared"]) + " |")
            continue
        ref_spread = max(new_rows[(case, ref)]["spread"], old_rows[(case, ref)]["spread"])
        if ref_spread > REFERENCE_NOISY:
            note = f"reference noisy ({100 * ref_spread:.0f}% spread): not tested"
            lines.append("| " + " | ".join(cells + ["", "", note]) + " |")
            continue
        n_new = _normalized(r, new_rows[(case, ref)])
        n_old = _normalized(o, old_rows[(case, ref)])
        change = float(np.median(n_new) / np.median(n_old))
        p_up, p_down = _one_sided_p(n_new, n_old), _one_sided_p(n_old, n_new)
        mark = ""
        if impl.startswith("torch"):
            mark = "peer: not tested"        # its code is not what is being compared
        elif p_up is not None and min(change, raw) > 1 + REGRESSION and p_up < level:
            mark = "REGRESSION"
            regressions.append(r)
        elif p_down is not None and max(change, raw) < 1 - REGRESSION and p_down < level:
            mark = "faster"
        p = p_up if change >= 1 else p_down
        lines.append("| " + " | ".join(cells + [f"{change:.2f}",
                                                "n/a" if p is None else f"{p:.1g}",
                                                mark]) + " |")
    if drift:
        lines.append("")
        lines.append(f"Machine drift (the references' raw new/old): median "
                     f"{float(np.median(drift)):.2f}, {min(drift):.2f} to {max(drift):.2f}")
    return lines, regressions


def plot(result, path):
    """A PNG: per case, the fraction of the bandwidth bound of each implementation
    (left) and the speed-up over the best torch optimizer (right)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastopt[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result["rows"] if "omitted" not in r and r["impl"] != "ceiling"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    at = {(r["case"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.42 * len(cases) + 2.5), sharey=True)
    y = np.arange(len(cases))
    h = 0.8 / max(1, len(impls))
    colors = plt.get_cmap("tab10")
    for k, impl in enumerate(impls):
        bound = [at[(c, impl)]["of_bound"] if (c, impl) in at else np.nan for c in cases]
        axes[0].barh(y + k * h, bound, h, label=impl, color=colors(k % 10))
        if impl.startswith("fastopt"):
            sp = [at[(c, impl)]["vs_torch"] if (c, impl) in at and at[(c, impl)]["vs_torch"]
                  else np.nan for c in cases]
            axes[1].barh(y + k * h, sp, h, color=colors(k % 10))
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("fraction of the memory-bandwidth bound (median step)")
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("speed-up over the best torch.optim (median step, log)")
    axes[0].set_yticks(y + 0.4 - h / 2)
    axes[0].set_yticklabels(cases, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(result["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
