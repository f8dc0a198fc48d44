"""Storage formats: how parameters and optimizer state are kept in memory.

A step is (rule) x (storage format) x (backend).  Rule math computes in the
*compute dtype* (float32, or float64 for float64 parameters) and never knows how a
value was stored; a format is the pair of functions that load a stored value into
the compute dtype and store the result back.  The drivers call
``load -> fused pre -> rule -> fused post -> store`` in one pass over memory.

Options (constructor arguments of every optimizer class)::

    state_bits   None | 32 | 16 | 8      precision of the state slots
    bf16_update  "split" | "kahan" | "stochastic" | "nearest"   (bfloat16 parameters)
    seed         int                     stream of "stochastic" rounding

Parameters are float32, float64 or bfloat16 (``ml_dtypes.bfloat16`` arrays; kernels
work on their ``uint16`` bits).  Gradients of a bfloat16 parameter are bfloat16 or
float32 (other float dtypes are converted to float32).

State (``state_bits``):

* ``None``: float32 for bfloat16 parameters, the parameter's dtype otherwise;
* ``32``: float32 (a float64 parameter then keeps float32 state);
* ``16``: bfloat16, stored with round-to-nearest-even;
* ``8``: block-wise quantized (:mod:`fastopt.storage.codecs`): each block of
  :data:`Q8_BLOCK` consecutive elements of a row (the first axis; a 1-D
  parameter is one row) keeps a float32 scale (its largest finite magnitude,
  ``<slot>_absmax``) and one byte per element.  Tensors with fewer than
  :data:`Q8_MIN_SIZE` elements keep float32 state (as bitsandbytes'
  ``min_8bit_size``), and so does the per-row state of row-wise rules (1/D of the
  parameter's bytes, and a block per row would cost 4 bytes of scale per byte).

bfloat16 parameters (``bf16_update``), the update computed in float32 from the
parameter's value, then written back as:

* ``"split"`` (default): the state keeps the low 16 bits of a float32 master
  (``master_low``, uint16); the parameter holds its high 16 bits (the master
  truncated), so parameter and low bits together are exactly the float32 master:
  2 more bytes per parameter, and the trajectory is float32 training's.  A NaN
  master shows as a NaN parameter;
* ``"kahan"``: a bfloat16 compensation buffer (``kahan_comp``): with ``u`` the
  float32 update, ``y = comp + u``, ``p' = rn(p + y)``, ``comp' = rn(y - (p' - p))``;
* ``"stochastic"``: the float32 result rounded up or down with probability given by
  the distance (unbiased); the random bits come from a counter-based hash of
  (``seed``, parameter index, step, element index), so results are bit-identical
  across runs and thread counts;
* ``"nearest"``: round to nearest even.  An update smaller than half an ulp of the
  parameter is lost (training stalls): use it only where updates are large.

``rn`` is round-to-nearest-even, as ``ml_dtypes`` and torch convert.
"""

import sys
from dataclasses import dataclass

import numpy as np

#: ``np.dtype(ml_dtypes.bfloat16)`` once loaded (:func:`bf16`); importing ml_dtypes
#: costs about 0.4 s, so it happens only when a bfloat16 array or option appears.
#: ``fastopt.storage.BF16`` (module attribute) loads it; None without ml_dtypes.
_BF16 = None
_NO_ML_DTYPES = None         # why ml_dtypes could not be imported, once tried

BF16_UPDATES = ("split", "kahan", "stochastic", "nearest")
STATE_BITS = (None, 32, 16, 8)
#: elements per 8-bit block (within a row)
Q8_BLOCK = 256
#: tensors with fewer elements keep float32 state under state_bits=8
Q8_MIN_SIZE = 4096
#: names of the extra state arrays of bfloat16 parameters
MASTER_LOW = "master_low"
KAHAN_COMP = "kahan_comp"
SCALE_SUFFIX = "_absmax"


def _load_bf16():
    """Import ml_dtypes (once); the bfloat16 dtype, or None without ml_dtypes."""
    global _BF16, _NO_ML_DTYPES
    if _BF16 is None and _NO_ML_DTYPES is None:
        try:
            import ml_dtypes
        except ImportError as exc:   # pragma: no cover - ml_dtypes is a dependency
            _NO_ML_DTYPES = str(exc)
        else:
            _BF16 = np.dtype(ml_dtypes.bfloat16)
            globals()["BF16"] = _BF16
    return _BF16


def bf16():
    """The bfloat16 dtype (``ml_dtypes.bfloat16``), importing ml_dtypes on first use;
    ImportError naming the package when it is not installed."""
    dt = _BF16 if _BF16 is not None else _load_bf16()
    if dt is None:
        need_ml_dtypes()
    return dt


def __getattr__(name):
    # ``storage.BF16``: the bfloat16 dtype (None without ml_dtypes), loaded on first use
    if name == "BF16":
        return _load_bf16()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_bf16(dtype):
    """Whether ``dtype`` is ``ml_dtypes.bfloat16``.  Does not import ml_dtypes: until
    something has imported it, no array can have its dtype (a dtype given by its
    name ``"bfloat16"`` loads it)."""
    if _BF16 is None:
        if "ml_dtypes" not in sys.modules and not (isinstance(dtype, str)
                                                   and dtype == "bfloat16"):
            return False
        if _load_bf16() is None:
            return False
    return np.dtype(dtype) == _BF16


def bf16_toward(v, down):
    """The bfloat16 value nearest ``v`` on its lower (``down``) or upper side."""
    f = np.float32(v)
    if (float(f) > v) if down else (float(f) < v):
        f = np.nextafter(f, np.float32(-np.inf if down else np.inf))
    b = int(np.array(f, np.float32).view(np.uint32))
    hi, rest = b >> 16, b & 0xFFFF
    # truncation moves toward zero: down for positives, up for negatives
    if rest and ((f < 0) == down):
        hi += 1
    return float(np.array(hi << 16, np.uint32).view(np.float32))


def bf16_fused_row(row, update):
    """The fused scalars (``fused.FIELDS`` order) of a bfloat16 parameter, so that
    what the model sees stays inside ``param_min``/``param_max`` and ``max_norm``:

    * the clamp bounds are rounded inward to bfloat16 values.  Every ``bf16_update``
      stores a value between its two bfloat16 neighbours, monotonically ("kahan"
      by :func:`fastopt.storage.codecs.bracket`), so a value inside bfloat16 bounds
      is stored inside them;
    * ``max_norm`` is lowered by 2**-7 for "kahan", "stochastic" and "nearest": a
      rounding moves an element by less than 2**-7 of its magnitude.  "split"
      truncates toward zero and needs no margin.
    """
    gs, clip, l1, lo, hi, mn = row
    if lo != -np.inf:
        lo = bf16_toward(lo, down=False)
    if hi != np.inf:
        hi = bf16_toward(hi, down=True)
    if mn != np.inf and update != "split":
        mn = mn * (1.0 - 2.0 ** -7)
    return (gs, clip, l1, lo, hi, mn)


def bf16_group(group, update):
    """``group`` with the bounds of :func:`bf16_fused_row` (for the reference)."""
    keys = ("param_min", "param_max", "max_norm")
    if all(group.get(k) is None for k in keys):
        return group
    inf = float("inf")
    row = (1.0, inf, 0.0, *(float(group[k]) if group.get(k) is not None else d
                            for k, d in zip(keys, (-inf, inf, inf))))
    new = bf16_fused_row(row, update)[3:]
    return {**group, **{k: v for k, v in zip(keys, new) if group.get(k) is not None}}


#: the storage options, as optimizer arguments and as param-group entries
OPTIONS = ("state_bits", "bf16_update", "seed")


def check_options(state_bits, bf16_update, seed):
    """Validate the storage options; ValueError naming the value."""
    if isinstance(state_bits, bool) or state_bits not in STATE_BITS:
        raise ValueError(f"Invalid state_bits: {state_bits!r} (use None, 32, 16 or 8)")
    if bf16_update is None:
        bf16_update = "split"
    if bf16_update not in BF16_UPDATES:
        raise ValueError(f"Invalid bf16_update: {bf16_update!r} (use one of {BF16_UPDATES})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed < 2 ** 63:
        raise ValueError(f"Invalid seed: {seed!r} (an integer in [0, 2**63))")
    if state_bits in (16,) or bf16_update != "split":
        need_ml_dtypes()
    return state_bits, bf16_update, int(seed)


def need_ml_dtypes():
    """Import ml_dtypes (bfloat16 arrays or options are in use), or raise ImportError."""
    if _BF16 is None and _load_bf16() is None:
        raise ImportError("bfloat16 storage needs the ml_dtypes package: pip install ml_dtypes"
                          f" ({_NO_ML_DTYPES})")


@dataclass(frozen=True)
class Storage:
    """The storage format of one parameter and its state (what drivers specialize on)."""
    param: str = "native"      # "native" (float32/float64) or "bfloat16"
    update: str = "exact"      # bfloat16: one of BF16_UPDATES; "exact" otherwise
    state: str = "native"      # "native" (compute dtype), "float32", "bfloat16", "q8"
    signed: tuple = ()         # q8: per state slot, True when it can be negative

    @property
    def native(self):
        return self.param == "native" and self.state == "native"

    @property
    def stochastic(self):
        return self.update == "stochastic"

    @property
    def aux(self):
        """Name of the extra per-element array of a bfloat16 parameter, or None."""
        return {"split": MASTER_LOW, "kahan": KAHAN_COMP}.get(self.update)


NATIVE = Storage()


def compute_dtype(param_dtype):
    """The dtype the rule math runs in."""
    return np.dtype(np.float64) if np.dtype(param_dtype) == np.float64 else np.dtype(np.float32)


def storage_for(rule, param, state_bits, bf16_update):
    """The :class:`Storage` of parameter ``param`` under the optimizer's options."""
    bf = is_bf16(param.dtype)
    ct = compute_dtype(param.dtype)
    slot_size = int(np.prod(rule.slot_shape(param.shape), dtype=np.int64))
    if state_bits is None:
        state = "float32" if bf else "native"
    elif state_bits == 32:
        state = "native" if ct == np.float32 and not bf else "float32"
    elif rule.layout == "rowwise":
        state = "native" if not bf else "float32"       # per-row state stays 32-bit
    elif state_bits == 16:
        state = "bfloat16"
    elif slot_size < Q8_MIN_SIZE:
        state = "native" if not bf else "float32"
    else:
        state = "q8"
    if state == "float32" and ct == np.float32 and not bf:
        state = "native"
    signed = tuple(n not in rule.nonnegative_slots for n in rule.slots) if state == "q8" else ()
    return Storage(param="bfloat16" if bf else "native",
                   update=bf16_update if bf else "exact", state=state, signed=signed)


def state_dtype(storage, param_dtype):
    """The dtype a state slot is stored in."""
    kind = storage.state
    if kind == "bfloat16":
        return bf16()
    return {"native": compute_dtype(param_dtype), "float32": np.dtype(np.float32),
            "q8": np.dtype(np.uint8)}[kind]


def q8_blocks(shape):
    """(rows, blocks per row, row length) of the 8-bit block layout of a tensor."""
    shape = tuple(shape)
    if len(shape) <= 1:
        n = int(np.prod(shape, dtype=np.int64))
        return 1, -(-n // Q8_BLOCK), n
    d = int(np.prod(shape[1:], dtype=np.int64))
    return shape[0], -(-d // Q8_BLOCK), d


def layout(rule, storage, param_shape, param_dtype, slot_names):
    """The arrays to allocate for the used slots ``slot_names``:
    ``[(key, shape, dtype, kind)]`` where kind is ``"slot"``, ``"scale"`` or
    ``"aux"``."""
    out = []
    shape = rule.slot_shape(param_shape)
    sdt = state_dtype(storage, param_dtype)
    for name in slot_names:
        out.append((name, shape, sdt, "slot"))
        if storage.state == "q8":
            r, nb, _ = q8_blocks(shape)
            out.append((name + SCALE_SUFFIX, (r * nb,), np.dtype(np.float32), "scale"))
    if storage.aux == MASTER_LOW:
        out.append((MASTER_LOW, tuple(param_shape), np.dtype(np.uint16), "aux"))
    elif storage.aux == KAHAN_COMP:
        out.append((KAHAN_COMP, tuple(param_shape), bf16(), "aux"))
    return out


def initial_arrays(rule, storage, group, param_shape, param_dtype, slot_names, full):
    """The fresh state arrays ``{key: array}`` (``full(shape, value, dtype)``
    allocates on the backend): slots hold the rule's initial value encoded in the
    format (8-bit: code of +-1 and the value's magnitude as scale)."""
    from . import reference as ref
    out = {}
    for key, shape, dt, kind in layout(rule, storage, param_shape, param_dtype, slot_names):
        if kind == "slot":
            v0 = float(rule.slot_init(group, key))
            if storage.state == "q8":
                k = rule.slots.index(key)
                code = ref.q8_init_code(v0, storage.signed[k])
                out[key] = full(shape, code, dt)
                out[key + SCALE_SUFFIX] = full(
                    (q8_blocks(shape)[0] * q8_blocks(shape)[1],), abs(v0), np.float32)
            elif storage.state == "bfloat16":
                out[key] = full(shape, v0, dt)
            else:
                out[key] = full(shape, v0, dt)
        elif kind == "aux":
            out[key] = full(shape, 0, dt)
    return out


def stream_key(seed, index, step):
    """The 32-bit key of the stochastic-rounding stream of parameter ``index`` at
    ``step`` (splitmix64 of the three, folded to 32 bits)."""
    m = (1 << 64) - 1
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9
         + int(step) * 0x94D049BB133111EB) & m
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    x ^= x >> 31
    return (x ^ (x >> 32)) & 0xFFFFFFFF


def kernel_dtypes(storage, grad_kind, CT):
    """Element dtypes of (param, grad, state, aux) arrays as the kernels see them
    (bfloat16 as its uint16 bits)."""
    p = np.uint16 if storage.param == "bfloat16" else CT
    g = {"bfloat16": np.uint16, "float32": np.float32}.get(grad_kind, CT)
    s = {"native": CT, "float32": np.float32, "bfloat16": np.uint16,
         "q8": np.uint8}[storage.state]
    return p, g, s, np.uint16


def bytes_per_element(rule, storage, param_dtype, uses, grad_dtype):
    """Bytes a dense step moves per parameter element (read and written), and the
    bytes of state kept per element."""
    ct = compute_dtype(param_dtype)
    pb = 2 if storage.param == "bfloat16" else ct.itemsize
    aux = 2 if storage.aux else 0
    sb = {"native": ct.itemsize, "float32": 4, "bfloat16": 2,
          "q8": 1 + 4.0 / Q8_BLOCK}[storage.state]
    nslots = sum(1 for u in uses if u)
    moved = 2 * pb + np.dtype(grad_dtype).itemsize + 2 * aux + 2 * nslots * sb
    return moved, nslots * sb + aux
