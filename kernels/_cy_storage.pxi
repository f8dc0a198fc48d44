# Included by _cy_dense.pyx (it uses _step, _load_scalars, the plan checks, the
# prefetch and the option bits of that module).
#
# ------------------------------------------------------------------ the drivers
#
# The twin of the Numba CPU drivers (``make_stored_dense_driver``,
# ``make_stored_rows_driver``, ``make_stored_rowwise_driver`` in
# ``fastopt/backends/numba_cpu.py``), for every storage format: float32/float64
# parameters and state (updated in place), bfloat16 parameters (split / kahan /
# stochastic / nearest), float32 / bfloat16 / 8-bit state, bfloat16 or float32
# gradients.  Every element goes through ``load -> fused pre -> rule math -> fused
# post -> store`` with the same operations in the same order and dtype as Numba:
#
# * the codecs are bit-exact C copies of ``fastopt/storage/codecs.py`` (uint32
#   integer arithmetic, bit casts through ``memcpy``, ``floorf``/``sqrtf``, float32
#   arithmetic; the module is compiled with ``-ffp-contract=off`` and no fast-math);
# * values not kept in the compute dtype are loaded into compute-dtype buffers of a
#   block (``SBLK`` elements), the block goes through the one element loop
#   (``_step``: pre pass, rule math, post pass), then is stored.  Elements are
#   independent, so cutting Numba's loop into blocks changes no value;
# * 8-bit state: a block of ``Q8_BLOCK`` elements of a row; its new values stay in
#   the buffer, the block's scale is their largest finite magnitude (float32),
#   ``inv = min(1 / scale, FLT_MAX)``, then every value is encoded;
# * parameters or state kept in the compute dtype are updated in place (no
#   buffer).
#
# Format codes (the backend maps a ``fastopt.storage.Storage`` to them):

cdef enum:
    PK_NATIVE = 0          # parameter in the compute dtype
    PK_SPLIT = 1           # bfloat16 + master_low (uint16)
    PK_KAHAN = 2           # bfloat16 + kahan_comp (bfloat16)
    PK_STOCHASTIC = 3      # bfloat16, stochastic rounding
    PK_NEAREST = 4         # bfloat16, round to nearest even
    PK_COUNT = 5
    GK_NATIVE = 0          # gradient in the compute dtype
    GK_F32 = 1
    GK_BF16 = 2
    GK_COUNT = 3
    SK_NATIVE = 0          # state in the compute dtype
    SK_F32 = 1
    SK_BF16 = 2
    SK_Q8 = 3
    SK_COUNT = 4
    SBLK = 256             # fastopt.storage.Q8_BLOCK; the block of every stored loop

#: elements per 8-bit block this build was compiled for (``fastopt.storage.Q8_BLOCK``)
Q8_BLOCK_BUILT = SBLK
#: the format codes of the stored entry points
PARAM_KINDS = {"native": PK_NATIVE, "split": PK_SPLIT, "kahan": PK_KAHAN,
               "stochastic": PK_STOCHASTIC, "nearest": PK_NEAREST}
GRAD_KINDS = {"native": GK_NATIVE, "float32": GK_F32, "bfloat16": GK_BF16}
STATE_KINDS = {"native": SK_NATIVE, "float32": SK_F32, "bfloat16": SK_BF16, "q8": SK_Q8}
#: the columns of the stored dense table ``fmt`` (``fastopt.backends.base.FMT_*``)
FMT_COLUMNS = {"FMT_AUX": 0, "FMT_SCALE": 1, "FMT_N": 4, "FMT_ROW": 5, "FMT_NB": 6,
               "FMT_NSCALE": 7, "FMT_KEY": 8, "FMT_BASE": 9, "FMT_COLS": 10}

from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "fastopt_codecs.h":
    float fo_widen(uint16_t u) noexcept nogil
    uint16_t fo_round_nearest(float x) noexcept nogil
    uint16_t fo_round_stochastic(float x, uint32_t r) noexcept nogil
    uint16_t fo_split_high(float x) noexcept nogil
    uint16_t fo_split_low(float x) noexcept nogil
    float fo_join(uint16_t hi, uint16_t lo) noexcept nogil
    uint32_t fo_random16(uint32_t key, int64_t e) noexcept nogil
    void fo_kahan(uint16_t* p, uint16_t* a, float x) noexcept nogil
    float fo_scale_inverse(float s) noexcept nogil
    float fo_magnitude(float x) noexcept nogil
    uint8_t fo_encode_signed(float x, float inv) noexcept nogil
    float fo_decode_signed(uint8_t c, float s) noexcept nogil
    uint8_t fo_encode_unsigned(float x, float inv) noexcept nogil
    float fo_decode_unsigned(uint8_t c, float s) noexcept nogil


# One tensor (dense) or parameter (rows) in a stored format; flat element
# addressing ``e``; the scales are indexed by block.
cdef struct SFmt:
    int pkind
    int gkind
    int skind
    int smask              # 8-bit: bit k set when slot k can be negative
    char* P
    char* A                # master_low / kahan_comp (uint16 bits)
    const char* G          # dense only
    char* S[3]
    float* C[3]            # 8-bit scales
    uint32_t key           # stochastic rounding stream
    int64_t base           # element base of the stream (a row range of a larger tensor)


# ----------------------------------------------------------- loads and stores

cdef inline void _sload_p(floating* out, const SFmt* f, int64_t lo,
                          Py_ssize_t m) noexcept nogil:
    """The bfloat16 parameters ``[lo, lo + m)`` in the compute dtype."""
    cdef const uint16_t* P16 = (<const uint16_t*>f.P) + lo
    cdef const uint16_t* A16 = (<const uint16_t*>f.A) + lo
    cdef Py_ssize_t i
    if f.pkind == PK_SPLIT:
        for i in range(m):
            out[i] = <floating>fo_join(P16[i], A16[i])
    else:
        for i in range(m):
            out[i] = <floating>fo_widen(P16[i])


cdef inline void _sstore_p(const floating* x, const SFmt* f, int64_t lo,
                           Py_ssize_t m) noexcept nogil:
    """Write the new bfloat16 parameters ``[lo, lo + m)`` (io._bf16_param's stores)."""
    cdef uint16_t* P16 = (<uint16_t*>f.P) + lo
    cdef uint16_t* A16 = (<uint16_t*>f.A) + lo
    cdef Py_ssize_t i
    cdef float v
    if f.pkind == PK_SPLIT:
        for i in range(m):
            v = <float>x[i]
            P16[i] = fo_split_high(v)
            A16[i] = fo_split_low(v)
    elif f.pkind == PK_KAHAN:
        for i in range(m):
            fo_kahan(&P16[i], &A16[i], <float>x[i])
    elif f.pkind == PK_STOCHASTIC:
        for i in range(m):
            P16[i] = fo_round_stochastic(<float>x[i], fo_random16(f.key, f.base + lo + i))
    else:
        for i in range(m):
            P16[i] = fo_round_nearest(<float>x[i])


cdef inline void _sload_g(floating* out, const char* G, int gkind, int64_t lo,
                          Py_ssize_t m) noexcept nogil:
    """Gradients of another dtype than the compute dtype, widened."""
    cdef const uint16_t* G16
    cdef const float* G32
    cdef Py_ssize_t i
    if gkind == GK_BF16:
        G16 = (<const uint16_t*>G) + lo
        for i in range(m):
            out[i] = <floating>fo_widen(G16[i])
    else:
        G32 = (<const float*>G) + lo
        for i in range(m):
            out[i] = <floating>G32[i]


cdef inline void _sload_s(floating* out, const SFmt* f, int k, int64_t lo, Py_ssize_t m,
                          int64_t kb) noexcept nogil:
    """State slot ``k`` (not in the compute dtype) of ``[lo, lo + m)``; 8-bit: block
    ``kb``'s scale."""
    cdef const float* S32
    cdef const uint16_t* S16
    cdef const uint8_t* S8
    cdef float s
    cdef Py_ssize_t i
    if f.skind == SK_F32:
        S32 = (<const float*>f.S[k]) + lo
        for i in range(m):
            out[i] = <floating>S32[i]
    elif f.skind == SK_BF16:
        S16 = (<const uint16_t*>f.S[k]) + lo
        for i in range(m):
            out[i] = <floating>fo_widen(S16[i])
    else:
        S8 = (<const uint8_t*>f.S[k]) + lo
        s = f.C[k][kb]
        if f.smask & (1 << k):
            for i in range(m):
                out[i] = <floating>fo_decode_signed(S8[i], s)
        else:
            for i in range(m):
                out[i] = <floating>fo_decode_unsigned(S8[i], s)


cdef inline void _sstore_s(const floating* x, const SFmt* f, int k, int64_t lo,
                           Py_ssize_t m, int64_t kb) noexcept nogil:
    """Store state slot ``k``; 8-bit: the block's scale is the largest finite
    magnitude of its new values, then every value is encoded."""
    cdef float* S32
    cdef uint16_t* S16
    cdef uint8_t* S8
    cdef float a, v, inv
    cdef Py_ssize_t i
    if f.skind == SK_F32:
        S32 = (<float*>f.S[k]) + lo
        for i in range(m):
            S32[i] = <float>x[i]
    elif f.skind == SK_BF16:
        S16 = (<uint16_t*>f.S[k]) + lo
        for i in range(m):
            S16[i] = fo_round_nearest(<float>x[i])
    else:
        S8 = (<uint8_t*>f.S[k]) + lo
        a = 0.0
        for i in range(m):
            v = fo_magnitude(<float>x[i])
            a = v if v > a else a
        f.C[k][kb] = a
        inv = fo_scale_inverse(a)
        if f.smask & (1 << k):
            for i in range(m):
                S8[i] = fo_encode_signed(<float>x[i], inv)
        else:
            for i in range(m):
                S8[i] = fo_encode_unsigned(<float>x[i], inv)


# ------------------------------------------------------------------ one block

cdef void _sblock(floating zero, int rule, int ucode, int opts, const SFmt* f, int64_t lo,
                  Py_ssize_t m, int64_t kb, const floating* G, floating* pw, bint load_p,
                  bint store_p, const double* k, floating* wk,
                  const floating* c) noexcept nogil:
    """Elements ``[lo, lo + m)`` (``m <= SBLK``; one 8-bit block ``kb``):

    ``pw``: where the parameters are updated (the parameter itself when it is in the
    compute dtype, else a buffer, loaded when ``load_p``, stored when ``store_p``);
    ``G``: the gradients in the compute dtype, or NULL (catch-up only: slot 0 alone
    is loaded and stored); ``k``: the row's catch-up map (or NULL); ``wk``: 3 SBLK
    buffers for the state slots not kept in the compute dtype."""
    cdef floating* sp[3]
    cdef double a, b, cc, e, fp, fs
    cdef Py_ssize_t i
    cdef int s
    cdef floating s0
    if G == NULL:
        ucode = ucode & 1
    if load_p:
        _sload_p(pw, f, lo, m)
    for s in range(3):
        if f.skind == SK_NATIVE:
            sp[s] = (<floating*>f.S[s]) + lo
        else:
            sp[s] = wk + s * SBLK
            if ucode & (1 << s):
                _sload_s(sp[s], f, s, lo, m, kb)
    if k != NULL and not (k[0] == 1.0 and k[1] == 0.0 and k[2] == 0.0 and k[3] == 1.0):
        # element.apply_catch_up; a row whose map is exactly the identity (up to
        # date) is left as it is, as the numba drivers do (p + 0 would turn -0 into +0)
        a = k[0]
        b = k[1]
        cc = k[2]
        e = k[3]
        for i in range(m):
            fp = <double>pw[i]
            fs = <double>(sp[0][i] if ucode & 1 else zero)
            pw[i] = <floating>(_term(a, fp) + _term(b, fs))
            s0 = <floating>(_term(cc, fp) + _term(e, fs))
            if ucode & 1:
                sp[0][i] = s0
    if G != NULL:
        _step(zero, rule, ucode, opts, pw, G, sp[0], sp[1], sp[2], m, c)
    if store_p:
        _sstore_p(pw, f, lo, m)
    if f.skind != SK_NATIVE:
        for s in range(3):
            if ucode & (1 << s):
                _sstore_s(sp[s], f, s, lo, m, kb)


# -------------------------------------------------------------- dense driver

cdef void _schunk(floating zero, int rule, int ucode, int opts, const SFmt* base,
                  const int64_t* prow, const int64_t* frow, const int64_t* chunk,
                  Py_ssize_t blk, const double* hyper) noexcept nogil:
    """One chunk row ``(tensor, first block, end block)`` of a stored bucket."""
    cdef SFmt f = base[0]
    cdef floating buf[5 * SBLK]        # parameters, gradients, 3 state slots
    cdef floating* pw
    cdef const floating* G
    cdef floating c[NSCALARS]
    cdef int64_t kb, r, j0, lo, D = frow[5], nb = frow[6], q
    cdef Py_ssize_t m, n, ms
    cdef bint bf = f.pkind != PK_NATIVE
    cdef int s
    _load_scalars(c, hyper)
    f.P = <char*><intptr_t>prow[0]
    f.G = <const char*><intptr_t>prow[1]
    f.A = <char*><intptr_t>frow[0]
    for s in range(3):
        f.S[s] = <char*><intptr_t>prow[2 + s]
        f.C[s] = <float*><intptr_t>frow[1 + s]
    f.key = <uint32_t>frow[8]
    f.base = frow[9]
    for kb in range(chunk[1], chunk[2]):
        r = kb // nb
        j0 = (kb - r * nb) * blk
        lo = r * D + j0
        n = <Py_ssize_t>min(<int64_t>blk, D - j0)
        q = 0
        while q < n:        # SBLK at a time (one block of 8-bit state)
            ms = min(<Py_ssize_t>SBLK, n - q)
            if f.gkind == GK_NATIVE:
                G = (<const floating*>f.G) + lo + q
            else:
                _sload_g(buf + SBLK, f.G, f.gkind, lo + q, ms)
                G = buf + SBLK
            if bf:
                pw = &buf[0]
            else:
                pw = (<floating*>f.P) + lo + q
            _sblock(zero, rule, ucode, opts, &f, lo + q, ms, kb, G, pw, bf, bf, NULL,
                    buf + 2 * SBLK, c)
            q += ms


cdef int _check_kinds(str who, int pkind, int gkind, int skind, int dtype_code) except -1:
    if not (0 <= pkind < PK_COUNT and 0 <= gkind < GK_COUNT and 0 <= skind < SK_COUNT):
        raise ValueError(f"{who}: unknown format codes ({pkind}, {gkind}, {skind})")
    if pkind != PK_NATIVE and dtype_code != 0:
        raise ValueError(f"{who}: bfloat16 parameters compute in float32")
    return 0


def run_stored_dense(int rule_id, int dtype_code, int pkind, int gkind, int skind, int smask,
                     bint uses0, bint uses1, bint uses2, int opts,
                     const int64_t[:, ::1] ptrs, const int64_t[:, ::1] fmt,
                     const int64_t[:, ::1] chunks, const double[:, ::1] hyper,
                     const int64_t[::1] hidx, Py_ssize_t blk, Py_ssize_t nelem,
                     Py_ssize_t parallel_min):
    """``make_stored_dense_driver``'s twin: rule ``rule_id`` over the blocks of every
    chunk of a stored bucket.

    ``dtype_code``: the compute dtype (0 float32, 1 float64); ``pkind``, ``gkind``,
    ``skind``: the parameter, gradient and state formats (:data:`PARAM_KINDS`,
    :data:`GRAD_KINDS`, :data:`STATE_KINDS`), ``smask``: the signed 8-bit slots.
    ``ptrs`` int64 (T, 2 + NSLOTS): param, grad and slot addresses; ``fmt`` int64
    (T, 10): the columns
    :data:`FMT_COLUMNS` (aux address, 3 scale addresses, element count, row length,
    blocks per row, scale count, stream key, element base); ``chunks`` (C, 3): ``(tensor, first
    block, end block)``; block ``k`` is row ``k // nb``, elements ``[(k % nb) * blk,
    ...)`` of it (``blk``: ``Q8_BLOCK`` for 8-bit state, else the chunk size).  A
    parallel region (static schedule) when ``nelem >= parallel_min``.  The tables are
    validated, the addresses trusted."""
    cdef Py_ssize_t T = ptrs.shape[0], C = chunks.shape[0], R = hyper.shape[0]
    cdef Py_ssize_t ci, t, bad = -1
    cdef int64_t n, D, nb, nsc
    cdef int ucode = (1 if uses0 else 0) | (2 if uses1 else 0) | (4 if uses2 else 0)
    cdef SFmt base
    _check_common("run_stored_dense", rule_id, R_COUNT, dtype_code, opts, hyper.shape[1],
                  False)
    _check_kinds("run_stored_dense", pkind, gkind, skind, dtype_code)
    if ptrs.shape[1] != NCOLS or chunks.shape[1] != 3 or fmt.shape[1] != 10:
        raise ValueError(f"run_stored_dense: tables must be ptrs (T, {NCOLS}), fmt (T, 10), "
                         f"chunks (C, 3)")
    if hidx.shape[0] != T or fmt.shape[0] != T:
        raise ValueError(f"run_stored_dense: hidx has {hidx.shape[0]} rows and fmt "
                         f"{fmt.shape[0]} for {T} tensors")
    if blk <= 0 or (skind == SK_Q8 and blk != SBLK):
        raise ValueError(f"run_stored_dense: bad block size {blk} (8-bit blocks: {SBLK})")
    if C == 0:
        return
    for t in range(T):
        n, D, nb, nsc = fmt[t, 4], fmt[t, 5], fmt[t, 6], fmt[t, 7]
        if not (0 <= hidx[t] < R and n >= 0 and D >= 0 and nb >= 0 and nsc >= 0
                and (nb == 0 or (nsc % nb == 0 and (nsc // nb) * D == n
                                 and (nb - 1) * blk < D <= nb * blk))):
            raise IndexError(f"run_stored_dense: bad table row {t}: hidx {hidx[t]} "
                             f"({R} scalar rows), fmt {tuple(fmt[t, k] for k in range(10))}")
    with nogil:
        for ci in range(C):
            if not (0 <= chunks[ci, 0] < T and 0 <= chunks[ci, 1] <= chunks[ci, 2]
                    <= fmt[chunks[ci, 0], 7]):
                bad = ci
                break
    if bad >= 0:
        raise IndexError(f"run_stored_dense: bad chunk row {bad}: "
                         f"{(chunks[bad, 0], chunks[bad, 1], chunks[bad, 2])} ({T} tensors)")
    base.pkind = pkind
    base.gkind = gkind
    base.skind = skind
    base.smask = smask
    cdef const int64_t* pp = &ptrs[0, 0]
    cdef const int64_t* fp = &fmt[0, 0]
    cdef const int64_t* cp = &chunks[0, 0]
    cdef const double* hp = &hyper[0, 0]
    cdef const int64_t* ip = &hidx[0]
    cdef const int64_t* ch
    if nelem >= parallel_min:
        for ci in prange(C, nogil=True, schedule="static"):
            ch = cp + 3 * ci
            if dtype_code == 0:
                _schunk(<float>0, rule_id, ucode, opts, &base, pp + ch[0] * NCOLS,
                        fp + ch[0] * 10, ch, blk, hp + ip[ch[0]] * NSCALARS)
            else:
                _schunk(<double>0, rule_id, ucode, opts, &base, pp + ch[0] * NCOLS,
                        fp + ch[0] * 10, ch, blk, hp + ip[ch[0]] * NSCALARS)
    else:
        with nogil:
            for ci in range(C):
                ch = cp + 3 * ci
                if dtype_code == 0:
                    _schunk(<float>0, rule_id, ucode, opts, &base, pp + ch[0] * NCOLS,
                            fp + ch[0] * 10, ch, blk, hp + ip[ch[0]] * NSCALARS)
                else:
                    _schunk(<double>0, rule_id, ucode, opts, &base, pp + ch[0] * NCOLS,
                            fp + ch[0] * 10, ch, blk, hp + ip[ch[0]] * NSCALARS)


# --------------------------------------------------------------- row drivers
#
# ``make_stored_rows_driver``'s twin: each unique row ``uniq[u]`` (D elements in
# blocks of SBLK, the 8-bit blocks of the row) is caught up (exact mode, every
# row), stepped with its gradient row (duplicates summed into a scratch row in order
# of appearance, in the compute dtype), renormalized (max_norm: on a row buffer,
# the parameters stored after) and stored.  ``vals`` arrive in the compute dtype
# (the backend converts them, as run_stored_rows does).

cdef inline const floating* _summed(const floating* V, Py_ssize_t D, const int64_t* order,
                                    int64_t a, int64_t b, floating* buf) noexcept nogil:
    cdef const floating* G = V + order[a] * D
    cdef const floating* row
    cdef int64_t k
    cdef Py_ssize_t j
    if b - a > 1:
        for j in range(D):
            buf[j] = G[j]
        for k in range(a + 1, b):
            row = V + order[k] * D
            for j in range(D):
                buf[j] = buf[j] + row[j]
        G = buf
    return G


cdef void _srow(floating zero, int rule, int ucode, int opts, const SFmt* f, bint stepping,
                const floating* V, Py_ssize_t D, const int64_t* order, const int64_t* seg,
                Py_ssize_t u, int64_t r, const double* coef, floating* gbuf, floating* prow,
                const floating* c, floating eps, const floating* sums) noexcept nogil:
    cdef floating buf[4 * SBLK]        # parameters, 3 state slots
    cdef const floating* G = NULL
    cdef const double* k = NULL
    cdef floating* pw
    cdef int64_t off = r * D, nb = (D + SBLK - 1) // SBLK, jb, j0
    cdef Py_ssize_t m
    cdef bint bf = f.pkind != PK_NATIVE
    cdef bint mx = (opts & OPT_MAX_NORM) != 0
    if stepping:
        if sums != NULL and seg[u + 1] - seg[u] > 1:
            G = sums + u * D             # summed by _stream_sums
        else:
            G = _summed(V, D, order, seg[u], seg[u + 1], gbuf)
    if coef != NULL:
        k = coef + 4 * u
    for jb in range(nb):
        j0 = jb * SBLK
        m = <Py_ssize_t>min(<int64_t>SBLK, D - j0)
        if not bf:
            pw = (<floating*>f.P) + off + j0
        elif mx:
            pw = prow + j0
        else:
            pw = &buf[0]
        _sblock(zero, rule, ucode, opts, f, off + j0, m, r * nb + jb,
                (G + j0) if stepping else NULL, pw, bf, bf and not mx, k, buf + SBLK, c)
    if mx:
        if bf:
            renorm_row(prow, D, c, zero, eps)
            _sstore_p(prow, f, off, D)
        else:
            renorm_row((<floating*>f.P) + off, D, c, zero, eps)


cdef inline void _sprefetch_ahead(floating zero, int ucode, bint stepping, const SFmt* f,
                                  const floating* V, Py_ssize_t D, const int64_t* order,
                                  const int64_t* seg, const int64_t* uniq, Py_ssize_t u,
                                  Py_ssize_t nuniq) noexcept nogil:
    """The twin of the Numba row driver's prefetch: the parameter, aux and used state
    rows of unique row ``u + PREFETCH_AHEAD`` in their formats, and its gradient row
    when it is alone (a hint only: it never faults and changes no value)."""
    cdef Py_ssize_t v = u + PREFETCH_AHEAD
    cdef int64_t off
    cdef Py_ssize_t pb = sizeof(floating) if f.pkind == PK_NATIVE else 2
    cdef Py_ssize_t sb
    cdef int s
    if v >= nuniq:
        return
    if f.skind == SK_NATIVE:
        sb = sizeof(floating)
    elif f.skind == SK_F32:
        sb = 4
    elif f.skind == SK_BF16:
        sb = 2
    else:
        sb = 1
    off = uniq[v] * D
    _prefetch_row(f.P + off * pb, D * pb)
    if f.pkind == PK_SPLIT or f.pkind == PK_KAHAN:
        _prefetch_row(f.A + off * 2, D * 2)
    if stepping:
        for s in range(3):
            if ucode & (1 << s):
                _prefetch_row(f.S[s] + off * sb, D * sb)
        if seg[v + 1] - seg[v] == 1:
            _prefetch_row(<const char*>(V + order[seg[v]] * D), D * sizeof(floating))
    elif ucode & 1:
        _prefetch_row(f.S[0] + off * sb, D * sb)


cdef void _task_rows(const int64_t* seg, Py_ssize_t n, bint weighted, Py_ssize_t t,
                     Py_ssize_t parts, Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    """The unique rows ``[lo, hi)`` of task ``t`` of ``parts``: contiguous ranges
    splitting ``seg[u] + UNIQUE_ROW_COST * u`` (gradient rows to sum and rows to
    update before unique row ``u``; ``u`` alone when not ``weighted``) evenly.  Each
    unique row belongs to one task, so each sum is formed by one task in order of
    appearance whatever ``parts`` is."""
    cdef int64_t total = (seg[n] if weighted else 0) + UNIQUE_ROW_COST * n
    cdef int64_t target
    cdef Py_ssize_t e, k, a, b, mid
    for e in range(2):
        k = t + e
        if k >= parts:
            b = n
        else:
            target = total * k // parts
            a = 0
            b = n
            while a < b:
                mid = (a + b) // 2
                if (seg[mid] if weighted else 0) + UNIQUE_ROW_COST * mid < target:
                    a = mid + 1
                else:
                    b = mid
        if e == 0:
            lo[0] = b
        else:
            hi[0] = b


cdef void _stream_sums(const floating* V, Py_ssize_t D, const int64_t* order,
                       const int64_t* seg, const int64_t* inv, Py_ssize_t nnz,
                       Py_ssize_t lo, Py_ssize_t hi, floating* sums) noexcept nogil:
    """The first phase of a fused row step: ``sums[u]`` for the repeated
    unique rows ``u`` in ``[lo, hi)``, the gradient rows read in their own order
    (``inv[i]``: the unique row of gradient row ``i``), added in order of appearance
    (the first copied)."""
    cdef Py_ssize_t i, j
    cdef int64_t w, a
    cdef floating* row
    cdef const floating* g
    for i in range(nnz):
        w = inv[i]
        if w < lo or w >= hi:
            continue
        a = seg[w]
        if seg[w + 1] - a == 1:
            continue
        row = sums + w * D
        g = V + i * D
        if i == order[a]:
            for j in range(D):
                row[j] = g[j]
        else:
            for j in range(D):
                row[j] = row[j] + g[j]


cdef void _srows_task(floating zero, int rule, int ucode, int opts, const SFmt* f,
                      bint stepping, const floating* Vp, Py_ssize_t D, const int64_t* order,
                      const int64_t* seg, const int64_t* uniq, Py_ssize_t nuniq,
                      const double* coef, const floating* c, floating eps, char* mine,
                      Py_ssize_t stride, const int64_t* inv, Py_ssize_t nnz, floating* sums,
                      Py_ssize_t t, Py_ssize_t parts) noexcept nogil:
    """One task of a fused row step: its unique rows' duplicate sums, then their
    updates (the sums still in cache)."""
    cdef Py_ssize_t lo, hi, u
    _task_rows(seg, nuniq, stepping, t, parts, &lo, &hi)
    if stepping and sums != NULL and hi > lo:
        _stream_sums(Vp, D, order, seg, inv, nnz, lo, hi, sums)
    for u in range(lo, hi):
        _sprefetch_ahead(zero, ucode, stepping, f, Vp, D, order, seg, uniq, u, hi)
        _srow(zero, rule, ucode, opts, f, stepping, Vp, D, order, seg, u, uniq[u], coef,
              <floating*>mine, <floating*>(mine + stride), c, eps, sums)


cdef void _srows(floating zero, int rule, int ucode, int opts, const SFmt* f, bint stepping,
                 const int64_t* V, Py_ssize_t D, const int64_t* order, const int64_t* seg,
                 const int64_t* uniq, Py_ssize_t nuniq, const double* h, const double* coef,
                 double renorm_eps, char* scratch, Py_ssize_t stride,
                 bint parallel, const int64_t* inv, Py_ssize_t nnz, char* sums) noexcept nogil:
    cdef const floating* Vp = <const floating*><intptr_t>V[0]
    cdef floating c[NSCALARS]
    cdef floating eps = <floating>renorm_eps
    cdef Py_ssize_t u, t, parts
    cdef char* mine
    _load_scalars(c, h)
    if sums != NULL:
        # fused: one task per thread owns a range of unique rows (sums and updates)
        parts = openmp.omp_get_max_threads() if parallel else 1
        if parallel:
            for t in prange(parts, schedule="static", chunksize=1, num_threads=parts):
                _srows_task(zero, rule, ucode, opts, f, stepping, Vp, D, order, seg, uniq,
                            nuniq, coef, c, eps, scratch + threadid() * 2 * stride, stride,
                            inv, nnz, <floating*>sums, t, parts)
        else:
            _srows_task(zero, rule, ucode, opts, f, stepping, Vp, D, order, seg, uniq, nuniq,
                        coef, c, eps, scratch, stride, inv, nnz, <floating*>sums, 0, 1)
    elif parallel:
        # dynamic: the rows with many duplicates (hot ids) are adjacent in ``uniq``
        for u in prange(nuniq, schedule="dynamic", chunksize=16):
            mine = scratch + threadid() * 2 * stride
            _sprefetch_ahead(zero, ucode, stepping, f, Vp, D, order, seg, uniq, u, nuniq)
            _srow(zero, rule, ucode, opts, f, stepping, Vp, D, order, seg, u, uniq[u], coef,
                  <floating*>mine, <floating*>(mine + stride), c, eps, NULL)
    else:
        for u in range(nuniq):
            _sprefetch_ahead(zero, ucode, stepping, f, Vp, D, order, seg, uniq, u, nuniq)
            _srow(zero, rule, ucode, opts, f, stepping, Vp, D, order, seg, u, uniq[u], coef,
                  <floating*>scratch, <floating*>(scratch + stride), c, eps, NULL)


def run_stored_rows(int rule_id, int dtype_code, int pkind, int skind, int smask,
                    bint uses0, bint uses1, bint uses2, int opts, const int64_t[::1] addrs,
                    Py_ssize_t nrows, Py_ssize_t D, Py_ssize_t nnz, const int64_t[::1] order,
                    const int64_t[::1] seg, const int64_t[::1] uniq,
                    const double[:, ::1] hyper, const double[:, ::1] coef, bint step,
                    int64_t key, double renorm_eps, Py_ssize_t parallel_min,
                    int64_t base=0, const int64_t[::1] inverse=None):
    """Row step of element-wise rule ``rule_id`` in a stored format (twin of
    ``make_stored_rows_driver``; with ``inverse``, duplicate sums and updates run
    in one parallel region, each thread summing the gradient rows of its own
    unique rows in their order, then updating them; the numba drivers gather each
    row's gradient rows just before its update: the same bits).  ``addrs`` int64 (9,): the parameter (nrows, D) in
    its format (bfloat16: uint16 bits), the gradient rows (nnz, D) in the compute
    dtype, the three state slots, the aux array (split/kahan), the three 8-bit
    scale arrays (nrows * ceil(D / Q8_BLOCK) each); unused entries are never read.
    ``coef``: float64 (nuniq, 4) catch-up maps (exact mode) or None; ``step``: False
    for a catch-up alone (flush).  Codes, options and parallel threshold as
    :func:`run_stored_dense`; the plan is checked; ``key``: the stochastic-rounding
    stream, ``base``: its element base (the index of element 0 in a larger tensor);
    ``inverse`` (nnz,): the unique row of each gradient row (``fastopt.sparse.row_plan``,
    checked against the plan), or None: each row's duplicates gathered and summed
    on their own."""
    cdef Py_ssize_t nuniq = uniq.shape[0]
    cdef int ucode = (1 if uses0 else 0) | (2 if uses1 else 0) | (4 if uses2 else 0)
    cdef Py_ssize_t stride
    cdef char* scratch
    cdef bint parallel
    cdef const double* kp = NULL
    cdef SFmt f
    cdef int s
    _check_common("run_stored_rows", rule_id, R_COUNT, dtype_code, opts, hyper.shape[1], True)
    _check_kinds("run_stored_rows", pkind, GK_NATIVE, skind, dtype_code)
    if addrs.shape[0] != 9 or hyper.shape[0] < 1:
        raise ValueError("run_stored_rows: addrs must have 9 entries and hyper at least "
                         "one row")
    if coef is not None and (coef.shape[0] != nuniq or coef.shape[1] != 4):
        raise ValueError(f"run_stored_rows: coef has shape ({coef.shape[0]}, "
                         f"{coef.shape[1]}), expected ({nuniq}, 4)")
    if step:
        if _check_plan("run_stored_rows", nrows, D, nnz, order, seg, uniq) == 0:
            return
    else:
        if coef is None:
            raise ValueError("run_stored_rows: step=False (catch-up only) needs coef")
        if nrows < 0 or D < 0:
            raise ValueError(f"run_stored_rows: negative size (nrows={nrows}, D={D})")
        if nuniq == 0 or D == 0:
            return
        _check_uniq("run_stored_rows", nrows, uniq)
    if coef is not None:
        kp = &coef[0, 0]
    f.pkind = pkind
    f.gkind = GK_NATIVE
    f.skind = skind
    f.smask = smask
    f.P = <char*><intptr_t>addrs[0]
    f.G = NULL
    for s in range(3):
        f.S[s] = <char*><intptr_t>addrs[2 + s]
        f.C[s] = <float*><intptr_t>addrs[6 + s]
    f.A = <char*><intptr_t>addrs[5]
    f.key = <uint32_t>key
    f.base = base
    cdef const int64_t* ip = NULL
    cdef char* sums = NULL
    if step and inverse is not None and nnz > nuniq:
        _check_inverse("run_stored_rows", nnz, order, seg, uniq.shape[0], inverse)
        ip = &inverse[0]
    parallel = nuniq * D >= parallel_min
    scratch = _scratch_rows2("run_stored_rows", dtype_code, D, parallel, &stride)
    if ip != NULL:
        sums = <char*>malloc(nuniq * D * (4 if dtype_code == 0 else 8))
        if sums == NULL:
            free(scratch)
            raise MemoryError("run_stored_rows: no memory for the duplicate sums")
    cdef const int64_t* vp = &addrs[1]
    cdef const int64_t* op = &order[0] if step else NULL
    cdef const int64_t* sp = &seg[0] if step else NULL
    cdef const int64_t* up = &uniq[0]
    cdef const double* hp = &hyper[0, 0]
    try:
        with nogil:
            if dtype_code == 0:
                _srows(<float>0, rule_id, ucode, opts, &f, step, vp, D, op, sp, up, nuniq,
                       hp, kp, renorm_eps, scratch, stride, parallel, ip, nnz, sums)
            else:
                _srows(<double>0, rule_id, ucode, opts, &f, step, vp, D, op, sp, up, nuniq,
                       hp, kp, renorm_eps, scratch, stride, parallel, ip, nnz, sums)
    finally:
        free(scratch)
        free(sums)


cdef char* _scratch_rows2(str who, int dtype_code, Py_ssize_t D, bint parallel,
                          Py_ssize_t* stride) except NULL:
    """Two cache-line-aligned rows of D elements per OpenMP thread (one pair when
    serial); ``stride[0]`` receives the size of one row in bytes."""
    cdef Py_ssize_t item = 4 if dtype_code == 0 else 8
    cdef Py_ssize_t nthreads = openmp.omp_get_max_threads() if parallel else 1
    stride[0] = (D * item + 127) // 128 * 128
    cdef char* scratch = <char*>malloc(max(2 * nthreads * stride[0], 1))
    if scratch == NULL:
        raise MemoryError(f"{who}: no memory for the scratch rows")
    return scratch


# ``make_stored_rowwise_driver``'s twin: a row-wise rule whose parameter is stored
# as bfloat16 (or whose per-row state is float32 under a float64 parameter): the row
# is loaded into a buffer, the gradient side of the options applied to the summed
# gradient row, the row math run, the parameter side and max_norm applied, the row
# stored.

cdef void _srowwise_one(floating inv_d, floating zero, int opts, const SFmt* f,
                        const floating* V, Py_ssize_t D, const int64_t* order, int64_t a,
                        int64_t b, int64_t r, floating* gbuf, floating* pbuf,
                        const floating* c, floating eps) noexcept nogil:
    cdef const floating* G = _summed(V, D, order, a, b, gbuf)
    cdef int64_t off = r * D
    cdef bint bf = f.pkind != PK_NATIVE
    cdef floating* prow = pbuf if bf else (<floating*>f.P) + off
    cdef floating acc
    if bf:
        _sload_p(prow, f, off, D)
    if opts & OPT_PRE:
        pre_pass(gbuf, G, D, c, opts)
        G = gbuf
    if f.skind == SK_F32:
        acc = <floating>(<float*>f.S[0])[r]
        (<float*>f.S[0])[r] = <float>rowwise_adagrad(prow, G, acc, inv_d, D, c)
    else:
        acc = (<floating*>f.S[0])[r]
        (<floating*>f.S[0])[r] = rowwise_adagrad(prow, G, acc, inv_d, D, c)
    if opts & OPT_POST:
        post_pass(prow, D, c, zero, opts)
    if opts & OPT_MAX_NORM:
        renorm_row(prow, D, c, zero, eps)
    if bf:
        _sstore_p(prow, f, off, D)


cdef void _srowwise(floating zero, int opts, const SFmt* f, const int64_t* V, Py_ssize_t D,
                    const int64_t* order, const int64_t* seg, const int64_t* uniq,
                    Py_ssize_t nuniq, const double* h, double renorm_eps, char* scratch,
                    Py_ssize_t stride, bint parallel) noexcept nogil:
    cdef const floating* Vp = <const floating*><intptr_t>V[0]
    cdef floating c[NSCALARS]
    cdef floating inv_d = (<floating>1) / (<floating>D)
    cdef floating eps = <floating>renorm_eps
    cdef Py_ssize_t u
    cdef char* mine
    _load_scalars(c, h)
    if parallel:
        for u in prange(nuniq, schedule="dynamic", chunksize=16):
            mine = scratch + threadid() * 2 * stride
            _srowwise_one(inv_d, zero, opts, f, Vp, D, order, seg[u], seg[u + 1], uniq[u],
                          <floating*>mine, <floating*>(mine + stride), c, eps)
    else:
        for u in range(nuniq):
            _srowwise_one(inv_d, zero, opts, f, Vp, D, order, seg[u], seg[u + 1], uniq[u],
                          <floating*>scratch, <floating*>(scratch + stride), c, eps)


def run_stored_rowwise(int rule_id, int dtype_code, int pkind, int skind, int opts,
                       const int64_t[::1] addrs, Py_ssize_t nrows, Py_ssize_t D,
                       Py_ssize_t nnz, const int64_t[::1] order, const int64_t[::1] seg,
                       const int64_t[::1] uniq, const double[:, ::1] hyper, int64_t key,
                       double renorm_eps, Py_ssize_t parallel_min, int64_t base=0):
    """Step of row-wise rule ``rule_id`` in a stored format (twin of
    ``make_stored_rowwise_driver``).  ``addrs`` int64 (4,): the parameter (nrows, D)
    in its format, the gradient rows (nnz, D) in the compute dtype, the per-row
    state (nrows,) (``skind``: the compute dtype or float32), the aux array."""
    cdef Py_ssize_t nuniq = uniq.shape[0]
    cdef Py_ssize_t stride
    cdef char* scratch
    cdef bint parallel
    cdef SFmt f
    _check_common("run_stored_rowwise", rule_id, len(ROWWISE_NAMES), dtype_code, opts,
                  hyper.shape[1], True)
    _check_kinds("run_stored_rowwise", pkind, GK_NATIVE, skind, dtype_code)
    if skind not in (SK_NATIVE, SK_F32):
        raise ValueError("run_stored_rowwise: the per-row state is float32 or the compute "
                         "dtype")
    if addrs.shape[0] != 4 or hyper.shape[0] < 1:
        raise ValueError("run_stored_rowwise: addrs must have 4 entries and hyper at least "
                         "one row")
    if _check_plan("run_stored_rowwise", nrows, D, nnz, order, seg, uniq) == 0:
        return
    f.pkind = pkind
    f.gkind = GK_NATIVE
    f.skind = skind
    f.smask = 0
    f.P = <char*><intptr_t>addrs[0]
    f.G = NULL
    f.S[0] = <char*><intptr_t>addrs[2]
    f.S[1] = f.S[0]
    f.S[2] = f.S[0]
    f.C[0] = f.C[1] = f.C[2] = NULL
    f.A = <char*><intptr_t>addrs[3]
    f.key = <uint32_t>key
    f.base = base
    parallel = nuniq * D >= parallel_min
    scratch = _scratch_rows2("run_stored_rowwise", dtype_code, D, parallel, &stride)
    cdef const int64_t* vp = &addrs[1]
    cdef const int64_t* op = &order[0]
    cdef const int64_t* sp = &seg[0]
    cdef const int64_t* up = &uniq[0]
    cdef const double* hp = &hyper[0, 0]
    try:
        with nogil:
            if dtype_code == 0:
                _srowwise(<float>0, opts, &f, vp, D, op, sp, up, nuniq, hp, renorm_eps,
                          scratch, stride, parallel)
            else:
                _srowwise(<double>0, opts, &f, vp, D, op, sp, up, nuniq, hp, renorm_eps,
                          scratch, stride, parallel)
    finally:
        free(scratch)


# ------------------------------------------------------------ codecs (tests)

def codec_bf16(const float[::1] x, const uint32_t[::1] r, uint16_t[::1] nearest,
               uint16_t[::1] stochastic, uint16_t[::1] high, uint16_t[::1] low,
               float[::1] joined):
    """The bfloat16 codecs over arrays (parity tests against
    ``fastopt.storage.reference``): round_nearest, round_stochastic(x, r), split,
    join of the split."""
    cdef Py_ssize_t i, n = x.shape[0]
    for i in range(n):
        nearest[i] = fo_round_nearest(x[i])
        stochastic[i] = fo_round_stochastic(x[i], r[i])
        high[i] = fo_split_high(x[i])
        low[i] = fo_split_low(x[i])
        joined[i] = fo_join(high[i], low[i])


def codec_widen(const uint16_t[::1] u, float[::1] out):
    cdef Py_ssize_t i
    for i in range(u.shape[0]):
        out[i] = fo_widen(u[i])


def codec_random16(uint32_t key, const int64_t[::1] e, uint32_t[::1] out):
    cdef Py_ssize_t i
    for i in range(e.shape[0]):
        out[i] = fo_random16(key, e[i])


def codec_q8(bint signed, const float[::1] x, const float[::1] inv, uint8_t[::1] codes,
             const uint8_t[::1] c, const float[::1] s, float[::1] decoded,
             float[::1] magnitude, float[::1] inverse):
    """The 8-bit codecs over arrays: ``codes = encode(x, inv)``, ``decoded =
    decode(c, s)``, ``magnitude(x)``, ``inverse = scale_inverse(s)``."""
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        codes[i] = fo_encode_signed(x[i], inv[i]) if signed else \
            fo_encode_unsigned(x[i], inv[i])
        magnitude[i] = fo_magnitude(x[i])
    for i in range(c.shape[0]):
        decoded[i] = fo_decode_signed(c[i], s[i]) if signed else \
            fo_decode_unsigned(c[i], s[i])
        inverse[i] = fo_scale_inverse(s[i])
