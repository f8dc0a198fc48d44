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

CEILING_SLACK = 1.05
BOUND_SLACK = 1.05
NOISY = 0.10
#: a regression in --compare: slower by more than this and than the two spreads
REGRESSION = 0.10


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


def compare(old, new):
    """``(lines, regressions)``: a Markdown table of new/old median time per
    (case, implementation) present in both, and the rows that got slower by more
    than :data:`REGRESSION` and than the two spreads together."""
    key = {(r["case"], r["impl"]): r for r in old["rows"] if "omitted" not in r}
    lines = [f"Old: {old['machine']} ({old.get('started', '?')})",
             f"New: {new['machine']} ({new.get('started', '?')})", "",
             "| case | implementation | old median | new median | new/old | spreads | |",
             "|---|---|---:|---:|---:|---:|---|"]
    regressions = []
    for r in new["rows"]:
        o = key.get((r["case"], r["impl"]))
        if o is None or "omitted" in r:
            continue
        ratio = r["median_s"] / o["median_s"]
        noise = r["spread"] + o["spread"]
        mark = ""
        if ratio > 1 + max(REGRESSION, noise):
            mark = "REGRESSION"
            regressions.append(r)
        elif ratio < 1 - max(REGRESSION, noise):
            mark = "faster"
        lines.append(f"| {r['case']} | {r['impl']} | {_fmt_time(o['median_s'])} | "
                     f"{_fmt_time(r['median_s'])} | {ratio:.2f} | "
                     f"{100 * o['spread']:.0f}% / {100 * r['spread']:.0f}% | {mark} |")
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
