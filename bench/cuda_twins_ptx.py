"""Do the CUDA stored kernels compile plain float32/float64 to the same code as the plain ones?

Every backend carries plain kernels (float32/float64 parameters and state) and
stored ones (bfloat16 parameters, 16/8-bit state).  On the CPU the stored drivers
were timed running plain tensors (``bench/driver_twins.py``).  Without a GPU the
CUDA kernels cannot be timed, but they can be compiled: this script compiles the
plain dense kernel and the stored dense kernel forced onto a plain format (a
float32/float64 Adam parameter whose ``Storage`` says "not native" with state
"native", as ``bench/driver_twins.py`` does) to PTX for compute capability 9.0 with
numba-cuda's NVVM, and, where nvJitLink is installed, to a cubin whose ``ptxas``
report gives the registers, and compares:

* the whole kernel: PTX instructions, global loads / stores, branches, registers;
* the innermost loop (the element loop: the smallest backward-branch span holding
  a global store): its instructions, global loads and stores, branches, and the
  width of the loads and stores (``.f32`` / ``.f64`` / ``.b16`` ...).

Cases: Adam dense (``dense`` / ``stored_dense``), Adam rows (a row-sparse step:
``rows`` / ``stored_rows``), Adam rows with ``max_norm`` (``rows`` then ``renorm`` /
``stored_rows``, which steps a row into a row buffer, renormalizes, stores) and
RowWiseAdagrad (``rowwise`` / ``stored_rowwise``).

Needs NVVM (``pip install 'numba-cuda[cu13]'``), no GPU.  Run without the simulator:
``python bench/cuda_twins_ptx.py [--show-loops]``.  Prints a Markdown table.
"""

import argparse
import re
import sys
import types as pytypes


def _fake_device():
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))


def registers(ptx):
    """(registers, spill bytes) from ptxas through nvJitLink, or (None, None)."""
    try:
        from cuda.bindings import nvjitlink as n
    except ImportError:
        return None, None
    h = n.create(2, ["-arch=sm_90", "-verbose"])
    try:
        data = ptx.encode()
        n.add_data(h, n.InputType.PTX, data, len(data), "kernel")
        n.complete(h)
        buf = bytearray(n.get_info_log_size(h))
        n.get_info_log(h, buf)
    finally:
        n.destroy(h)
    log = bytes(buf).decode(errors="replace")
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores", log)
    return (int(regs[-1]) if regs else None), (int(spill[-1]) if spill else None)


def _instructions(lines):
    return [ln.strip() for ln in lines
            if ln.strip() and not ln.strip().startswith(("//", ".", "{", "}", "$"))
            and not ln.strip().endswith(":")]


def _count(instrs):
    ld = [i for i in instrs if re.match(r"(@%p\d+ )?ld\.global", i)]
    st = [i for i in instrs if re.match(r"(@%p\d+ )?st\.global", i)]
    br = [i for i in instrs if re.search(r"\bbra(\.uni)?\b", i)]
    cond = [i for i in br if i.startswith("@")]

    def widths(ops):
        out = {}
        for i in ops:
            w = i.split()[1 if i.startswith("@") else 0].split(".")[-1]
            out[w] = out.get(w, 0) + 1
        return ",".join(f"{k}x{v}" for k, v in sorted(out.items()))
    return dict(n=len(instrs), ld=len(ld), st=len(st), br=len(br), cond=len(cond),
                ld_w=widths(ld), st_w=widths(st))


def instruction_mix(ptx):
    """The kernel's PTX instructions as a multiset, with register numbers, parameter
    names and address offsets blanked (what is left: opcodes, types, operand kinds)."""
    from collections import Counter
    body = ptx[ptx.index("{", ptx.index(".entry")):]
    body = re.sub(r"_Z\w+", "NAME", body)
    body = re.sub(r"param_\d+", "param_N", body)
    body = re.sub(r"%(rd|r|fd|f|p|rs|h)\d+", r"%\1", body)
    body = re.sub(r"\+\d+\]", "+K]", body)
    return Counter(ln.strip() for ln in body.splitlines() if ln.strip())


def innermost_loop(ptx):
    """The instructions of the smallest loop (a label and a later branch back to it)
    that holds a global store."""
    lines = ptx.splitlines()
    labels = {}
    for k, ln in enumerate(lines):
        m = re.match(r"\s*(\$L__\w+):", ln)
        if m:
            labels[m.group(1)] = k
    best = None
    for k, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < k:
            body = lines[labels[m.group(1)]:k + 1]
            if any("st.global" in b for b in body) and (best is None or
                                                        len(body) < len(best)):
                best = body
    return best or []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--show-loops", action="store_true", help="print the loops' PTX")
    args = ap.parse_args(argv)
    try:
        from numba import cuda
        from numba.cuda import types
        _fake_device()
        import numpy as np
        from fastopt import planner, rules, storage
        from fastopt.backends import cuda as cb
    except ImportError as exc:
        print(f"cannot run here: {exc}")
        return 3

    class _ForcedStored(storage.Storage):
        @property
        def native(self):
            return False

    i64, b1 = types.int64, types.boolean
    tab = types.Array(i64, 2, "C")
    idx = types.Array(i64, 1, "C")
    f64_2d = types.Array(types.float64, 2, "C")
    f32_1d = types.Array(types.float32, 1, "C")
    u16_1d = types.Array(types.uint16, 1, "C")

    def kernels(name, dt, fused):
        """(what, plain [(kernel, PTX)], stored [(kernel, PTX)]) of one comparison."""
        rule = rules.RULES[name]
        group = rule.check_group({**rule.defaults, **fused})
        spec = planner.group_spec(rule, group)
        plain = planner.config(rule, dt, spec)
        forced = planner.config(rule, dt, spec, storage=_ForcedStored(state="native"))
        el = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}[
            np.dtype(dt)]
        a1, a2 = types.Array(el, 1, "C"), types.Array(el, 2, "C")

        def ptx(kernel, sig):
            return cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))[0]
        if rule.layout == "rowwise":
            return (f"{name} rows (row-wise)",
                    [("rowwise", ptx(cb.make_rowwise_kernel(plain),
                                     (a2, a1, a2) + (idx,) * 3 + (a2, f64_2d, i64, b1)))],
                    [("stored_rowwise", ptx(cb.make_stored_rowwise_kernel(forced),
                                            (a1, u16_1d, a1, a2, idx, idx, idx, f64_2d, a2,
                                             a2, i64, i64, i64, i64, b1)))])
        stored_rows = ("stored_rows", ptx(cb.make_stored_rows_kernel(forced, False, True),
                                          (a1, u16_1d) + (a1,) * 3 + (f32_1d,) * 3
                                          + (a2, idx, idx, idx, f64_2d, f64_2d, a2,
                                             i64, i64, i64, i64, b1)))
        rows = [("rows", ptx(cb.make_rows_kernel(plain, False, True),
                             (a2,) * 5 + (idx,) * 3 + (f64_2d, f64_2d, i64, b1)))]
        if fused.get("max_norm"):
            rows.append(("renorm", ptx(cb.make_renorm_kernel(plain),
                                       (a2, idx, f64_2d, i64, b1))))
            return f"{name} rows, max_norm", rows, [stored_rows]
        return (f"{name} dense",
                [("dense", ptx(cb.make_dense_kernel(plain), (tab, idx, tab, f64_2d)))],
                [("stored_dense", ptx(cb.make_stored_dense_kernel(forced),
                                      (tab, idx, idx, tab, tab, f64_2d)))]), \
            (f"{name} rows", rows, [stored_rows])

    print("| case | dtype | kernel | PTX instr | ld.global | st.global | branches "
          "| registers | loop instr | loop ld.global | loop st.global "
          "| loop branches (cond) | loop ld / st widths |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    same = []
    for dt in (np.float32, np.float64):
        cases = []
        for name, fused in (("Adam", {}), ("Adam", {"max_norm": 1.0}),
                            ("RowWiseAdagrad", {})):
            got = kernels(name, dt, fused)
            cases += list(got) if isinstance(got[0], tuple) else [got]
        for what, plain, stored in cases:
            if len(plain) == 1 and len(stored) == 1:
                same.append(f"{what} {np.dtype(dt).name}: "
                             f"{instruction_mix(plain[0][1]) == instruction_mix(stored[0][1])}")
            for kname, ptx in plain + stored:
                whole = _count(_instructions(ptx.splitlines()))
                loop_lines = innermost_loop(ptx)
                loop = _count(_instructions(loop_lines))
                regs, spill = registers(ptx)
                reg = "n/a" if regs is None else f"{regs}" + (
                    f" (spill {spill} B)" if spill else "")
                print(f"| {what} | {np.dtype(dt).name} | {kname} | {whole['n']} | "
                      f"{whole['ld']} | {whole['st']} | {whole['br']} | {reg} | {loop['n']} | "
                      f"{loop['ld']} | {loop['st']} | {loop['br']} ({loop['cond']}) | "
                      f"{loop['ld_w']} / {loop['st_w']} |", flush=True)
                if args.show_loops:
                    print(f"--- {what} {np.dtype(dt).name} {kname}", file=sys.stderr)
                    print("\n".join(loop_lines), file=sys.stderr)
    print("\nThe same PTX instructions (register numbers and offsets aside), plain and "
          "stored: " + "; ".join(same))
    return 0


if __name__ == "__main__":
    sys.exit(main())
