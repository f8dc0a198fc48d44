"""The generated tables of README.md and docs/benchmarks.md, and their check.

    python tools/readme_tables.py            # print every generated block
    python tools/readme_tables.py --write    # rewrite the marked blocks in place
    python tools/readme_tables.py --check    # exit 1 (with a diff) when a block is stale

Each block sits between two marker comments, ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``, and is generated from the code or a stored record, never
typed by hand:

* ``capability-table`` (README.md): the rule x backend x feature table, from the
  registry (:data:`fastopt.rules.RULES`), the feature names
  (:data:`fastopt.backends.base.FEATURES`) and the ``features`` each backend
  *class* declares.  It does not ask which backends are available on this
  machine (:func:`fastopt.backends.capabilities` lists only those): the CUDA
  backend's class is read without importing numba.cuda, and the Cython backend's
  class without loading its extension, so the table is the same everywhere.
* ``bench-headline`` (README.md): a few rows of the benchmark record
  ``docs/bench-2core-epyc.json``, formatted by ``fastopt bench --markdown``'s own
  code (:mod:`fastopt.benchmark.report`), so numbers and spreads are the record's.
* ``bench-table`` (docs/benchmarks.md): the whole ``fastopt bench --markdown``
  output of that record.
* ``feature-table`` (docs/backends.md): every feature name against every backend
  class's declaration.

``tests/test_docs.py`` calls :func:`stale` and fails while any block differs.
"""

import argparse
import difflib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_RECORD = os.path.join("docs", "bench-2core-epyc.json")

#: README headline: (case label, implementations); "torch" stands for the case's
#: fastest torch contender (the one "vs torch" is measured against)
HEADLINE = (
    ("Adam 10M float32", ("fastopt-numba", "torch")),
    ("AdamW 10M float32", ("fastopt-numba", "torch")),
    ("RMSprop 10M float32", ("fastopt-numba", "torch")),
    ("NAdam 10M float32", ("fastopt-numba", "torch")),
    ("Adam 10000x1K float32", ("fastopt-numba", "torch")),
    ("Adam 1000x10K float32", ("fastopt-numba", "torch")),
    ("Adam sparse 1Mx64 16K zipf", ("fastopt-numba", "torch")),
    ("Adagrad sparse 1Mx64 16K zipf", ("fastopt-numba", "torch")),
)


# ------------------------------------------------------------ capability table

def backend_classes():
    """name -> declared feature set of every backend class, in ``backends.KNOWN``
    order (the class attribute, not an instance: nothing is loaded)."""
    import importlib
    import pkgutil

    from fastopt import backends
    from fastopt.backends.base import Backend

    # every module of the package, so that each backend class is defined (importing
    # the modules imports neither numba.cuda nor the Cython extension; an import
    # error here is a real error, not an unavailable backend)
    for info in pkgutil.iter_modules(backends.__path__):
        importlib.import_module(f"{backends.__name__}.{info.name}")

    found, todo = {}, list(Backend.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        # only the package's own classes: a test may subclass a backend
        if cls.name and cls.__module__.startswith("fastopt.backends."):
            found[cls.name] = frozenset(cls.features)
    order = [n for n in backends.KNOWN if n in found] + sorted(set(found) - set(backends.KNOWN))
    return {n: found[n] for n in order}


def _code(s):
    return f"`{s}`"


def _variant_reasons(rule, reason_of):
    """Distinct reasons ``reason_of(group)`` gives over the rule's defaults and its
    registry variants (the configurations the tests exercise)."""
    reasons = []
    ok = False
    for v in ({},) + tuple(rule.variants):
        why = reason_of(rule.check_group({**rule.defaults, **v}))
        if why is None:
            ok = True
        elif why not in reasons:
            reasons.append(why)
    return ok, reasons


def capability_table():
    """The README's rule x backend x feature table (Markdown, no trailing newline)."""
    from fastopt import rules
    from fastopt.factored import refusal as factored_refusal
    from fastopt.backends.base import FEATURES
    from fastopt.rules import fused

    classes = backend_classes()
    names = list(classes)

    def who(needed):
        have = [n for n in names if set(needed) <= classes[n]]
        if not have:
            return "—"
        return "all" if have == names else ", ".join(have)

    notes = []

    def note(text):
        notes.append(text)
        return f" ({len(notes)})"

    columns = ("rule", "state (torch's names)", "dense", "sparse, lazy", "sparse, exact",
               "options", "float32, float64", "bfloat16 params", "16-, 8-bit state")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rule in rules.RULES.values():
        row = ["rowwise"] if rule.layout == "rowwise" else \
            ["tensor_norms"] if rule.per_tensor else \
            ["matrix"] if rule.layout == "matrix" else \
            ["factored"] if rule.factored else []
        state = [_code(s) for s in rule.slots] + [_code(k) + " (host)"
                                                  for k in rule.host_init(rule.defaults)]
        if rule.catch_up is None:
            exact = "—"
        else:
            ok, why = _variant_reasons(rule, rule.exact_reason)
            exact = who(["sparse_exact"] + row) if ok else "—"
            for w in why:
                exact += note(f"{rule.name}, `sparse_mode=\"exact\"`: {w}")
        # the per-tensor and matrix rules read the formats in their own passes
        stored = ["stored_passes"] if rule.per_tensor or rule.layout == "matrix" else []
        ok, why = _variant_reasons(rule, rule.low_state_reason)
        ok8, why8 = _variant_reasons(rule, rule.q8_reason)
        if ok and ok8:
            low = who(["state16", "state8"] + row + stored)
        elif ok:
            low = "16-bit: " + who(["state16"] + row + stored)
        else:
            low = "—"
        lacking = [n for n in names if stored and set(["state16", "bfloat16"] + row)
                   <= classes[n] and "stored_passes" not in classes[n]]
        if lacking and ok:
            low += note(f"{rule.name}, bfloat16 parameters and `state_bits=8` or `16` on "
                        f"{', '.join(lacking)}: refused when the optimizer is built (that "
                        f"backend lacks `stored_passes`: "
                        f"{FEATURES['stored_passes']})")
        if rule.storage_note and ok:
            low += note(f"{rule.name}, bfloat16 parameters and `state_bits=8` or `16`: "
                        f"{rule.storage_note}")
        for w in why:
            low += note(f"{rule.name}, `state_bits=8` or `16`: {w}")
        for w in why8:
            low += note(f"{rule.name}, `state_bits=8`: {w}")
        lines.append("| " + " | ".join([
            f"`fastopt.{rule.name}`" + (" (row-wise)" if rule.layout == "rowwise" else
                                        " (per-tensor)" if rule.per_tensor else
                                        " (matrix)" if rule.layout == "matrix" else
                                        " (factored)" if rule.factored else ""),
            ", ".join(state),
            who(["dense"] + row),
            "—" + note(f"{rule.name}: " + factored_refusal(rule, "a row-sparse gradient"))
            if rule.factored else
            "—" + note(f"{rule.name}: " + rule.tensor_refusal("a row-sparse gradient"))
            if rule.whole_tensor else who(["sparse_lazy"] + row),
            exact,
            ("l1, param_min, param_max, skip_nonfinite: " + who(
                ["fused_options", "skip_nonfinite"] + row) + note(
                f"{rule.name}: clip_value, max_norm and grad_scale are refused (the update "
                "pass reads the orthogonalized matrix in the gradient's place)"))
            if rule.layout == "matrix" else
            ("`skip_nonfinite`: " + who(["skip_nonfinite"] + row) + note(
                f"{rule.name}: the fused options and `grad_scale` are refused (its update "
                "runs by whole tensors: row and column sums, then the RMS of the update, "
                "then the update pass)")) if rule.factored else
            who(["fused_options", "grad_scale", "skip_nonfinite"] + row),
            who(["float32", "float64"] + row),
            (("—" + note(f"{rule.name}, bfloat16 parameters: {rule.bf16_reason()}"))
             if rule.bf16_reason is not None else who(["bfloat16"] + row + stored)),
            low]) + " |")
    every = fused.exact_reason({k: 1.0 for k in ("l1", "param_min", "param_max", "max_norm")})
    out = [f"Generated by `python tools/readme_tables.py --write` from `fastopt.rules.RULES`"
           f" and the `features` each backend class declares ({', '.join(names)}); "
           f"\"all\" means every one of them; \"options\": the fused options "
           f"({', '.join(fused.DEFAULTS)}), `grad_scale` and `skip_nonfinite`.", ""]
    out += lines + [""]
    out += [f"{k}. {t}" for k, t in enumerate(notes, 1)]
    out.append(f"{len(notes) + 1}. Every rule, `sparse_mode=\"exact\"`: {every}.")
    return "\n".join(out)


def feature_table():
    """docs/backends.md: every feature of :data:`fastopt.backends.base.FEATURES`
    against every backend class's declaration."""
    from fastopt.backends.base import FEATURES

    classes = backend_classes()
    names = list(classes)
    out = ["Generated by `python tools/readme_tables.py --write` from "
           "`fastopt.backends.base.FEATURES` and the `features` each backend class "
           "declares.", "",
           "| feature | what it is | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
    for f, what in FEATURES.items():
        out.append(f"| `{f}` | {what} | " +
                   " | ".join("✓" if f in classes[n] else "—" for n in names) + " |")
    return "\n".join(out)


# ------------------------------------------------------------ benchmark tables

def _record():
    from fastopt.benchmark import report
    return report, report.load_json(os.path.join(ROOT, BENCH_RECORD))


def bench_table():
    """``fastopt bench --markdown`` of the stored record (docs/benchmarks.md)."""
    report, result = _record()
    return report.markdown(result)


def bench_headline():
    """The README's rows of the stored record, formatted as ``fastopt bench
    --markdown`` formats them (its header lines, its columns)."""
    report, result = _record()
    by_case = {}
    for r in result["rows"]:
        by_case.setdefault(r["case"], []).append(r)
    rows = []
    for case, impls in HEADLINE:
        have = by_case[case]
        for impl in impls:
            if impl == "torch":
                torch = [r for r in have if r["impl"].startswith("torch") and "omitted" not in r]
                rows.append(min(torch, key=lambda r: r["median_s"]))
            else:
                rows.append(next(r for r in have if r["impl"] == impl))
    lines = [line + "  " for line in report.header(result)] + [""]
    lines.append("| " + " | ".join(report.COLUMNS) + " |")
    lines.append("|---|---|" + "---:|" * 7 + "---|")
    for cells in report.table_cells(rows):
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: file -> [(block name, generator)]
BLOCKS = {
    "README.md": [("capability-table", capability_table), ("bench-headline", bench_headline)],
    os.path.join("docs", "benchmarks.md"): [("bench-table", bench_table)],
    os.path.join("docs", "backends.md"): [("feature-table", feature_table)],
}


def _span(text, name, path):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i or text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{path}: expected one {start} ... {end} pair")
    return i + len(start), j


def current(path, name):
    """The text between a block's markers (without the newlines next to them)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    i, j = _span(text, name, path)
    return text[i:j].strip("\n")


def stale(root=None):
    """[(path, block name, unified diff)] of every block that differs from its
    generated text (empty when everything is current)."""
    out = []
    for path, blocks in BLOCKS.items():
        for name, make in blocks:
            have, want = current(path, name), make()
            if have != want:
                diff = "\n".join(difflib.unified_diff(
                    have.splitlines(), want.splitlines(), f"{path} ({name})",
                    "generated", lineterm=""))
                out.append((path, name, diff))
    return out


def write():
    for path, blocks in BLOCKS.items():
        full = os.path.join(ROOT, path)
        with open(full, encoding="utf-8") as f:
            text = f.read()
        for name, make in blocks:
            i, j = _span(text, name, path)
            text = text[:i] + "\n" + make() + "\n" + text[j:]
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 with a diff when a marked block is not the generated text")
    mode.add_argument("--write", action="store_true", help="rewrite the marked blocks")
    args = ap.parse_args(argv)
    if args.write:
        write()
        return 0
    if args.check:
        bad = stale()
        for path, name, diff in bad:
            print(diff)
        if bad:
            print(f"\nstale: {', '.join(f'{p} ({n})' for p, n, _ in bad)}; run "
                  "python tools/readme_tables.py --write", file=sys.stderr)
            return 1
        print("generated tables are current")
        return 0
    for path, blocks in BLOCKS.items():
        for name, make in blocks:
            print(f"<!-- {path}: {name} -->\n{make()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
