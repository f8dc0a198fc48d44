"""Optimizer (and scheduler) checkpoints: one atomic, checksummed ``.npz`` file.

Layout of the file (``np.savez``, uncompressed, readable with ``np.load``)::

    state/<param_index>/<name>   every state array (exp_avg, momentum_buffer, ...)
                                 in its own dtype and shape
    __header__                   uint8 array: UTF-8 JSON, see below

The header is a JSON object::

    {"format": "fastopt-checkpoint", "format_version": 1,
     "optimizer": "Adam",                      # optimizer.state_dict()["optimizer"]
     "state_dict": {...},                      # the state_dict minus "state":
                                               #   version, optimizer, param_groups, ...
     "state_index": [0, 1, ...],               # parameters that have state
     "scalars": [{"index": 0, "name": "step", "value": 5}, ...],  # non-array state
     "arrays": [{"key": "state/0/exp_avg", "index": 0, "name": "exp_avg",
                 "dtype": "<f4", "shape": [256, 128], "sha256": "..."}, ...],
     "scheduler": null | {"class": "StepLR", "state_dict": {...}},
     "extra": {...}}                           # the caller's JSON-able dict

Values in the header keep their Python types exactly: finite floats are JSON
numbers (Python writes ``repr(x)``, which reads back bit-exactly); ``inf``,
``-inf`` and ``nan`` are ``{"$float": "inf"}`` etc.; tuples (``betas``) are
``{"$tuple": [...]}``; dicts with non-string keys are ``{"$dict": [[k, v], ...]}``.
NumPy scalars are stored as the equivalent Python numbers.

Writing is atomic: a temporary file in the target's directory is written,
flushed and ``fsync``-ed, renamed over the target with ``os.replace`` and the
directory is ``fsync``-ed; on any error the temporary file is removed and an
existing target is left as it was.

Loading checks everything before changing anything -- the file is a readable
npz, the header parses and has this format and version, the optimizer name
matches, the arrays present are exactly the manifest's with its dtypes, shapes
and SHA-256 digests, the scheduler (if given) is of the saved class -- then
calls ``optimizer.load_state_dict`` (which checks shapes and dtypes; arrays are
never cast) and ``scheduler.load_state_dict``; if the latter fails the
optimizer's previous state is restored.  A corrupted or truncated file raises
``ValueError`` naming the path.
"""

import hashlib
import json
import math
import numbers
import os
import tempfile

import numpy as np

from .storage import bf16 as bf16_dtype, is_bf16

#: the manifest's dtype of a bfloat16 array (stored as its uint16 bits)
BF16_NAME = "bfloat16"

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fastopt-checkpoint"
FORMAT_VERSION = 1
HEADER_KEY = "__header__"


# ------------------------------------------------------------------ JSON encoding

def _enc(obj, where):
    """Python value -> JSON-able value that :func:`_dec` restores exactly."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real) and isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else {"$float": repr(x)}
    if isinstance(obj, tuple):
        return {"$tuple": [_enc(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_enc(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _enc(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"$dict": [[_enc(k, f"{where} key"), _enc(v, f"{where}[{k!r}]")]
                          for k, v in obj.items()]}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint header "
                    "(JSON-able values only: None, bool, int, float, str, list, tuple, dict)")


def _dec(obj):
    if isinstance(obj, list):
        return [_dec(v) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if k == "$float":
                if v not in ("inf", "-inf", "nan"):
                    raise ValueError(f"bad $float value {v!r}")
                return float(v)
            if k == "$tuple":
                return tuple(_dec(x) for x in v)
            if k == "$dict":
                return {_hashable(_dec(a)): _dec(b) for a, b in v}
        return {k: _dec(v) for k, v in obj.items()}
    return obj


def _hashable(k):
    if isinstance(k, list):
        return tuple(_hashable(x) for x in k)
    return k


def _digest(a):
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


# --------------------------------------------------------------------------- save

def _build(optimizer, scheduler, extra):
    """(header dict, {key: array}); raises TypeError before anything is written."""
    sd = optimizer.state_dict()
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise TypeError("optimizer.state_dict() did not return a state dict with 'state' and "
                        "'param_groups'")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    name = sd.get("optimizer", type(optimizer).__name__)
    arrays, manifest, scalars, index = {}, [], [], []
    for i, st in sd["state"].items():
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"state key {i!r} is not a parameter index (int)")
        i = int(i)
        index.append(i)
        for key, v in st.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise TypeError(f"state name {key!r} of parameter {i} must be a non-empty "
                                "string without '/'")
            if isinstance(v, np.ndarray):
                dtype_name = v.dtype.str
                if is_bf16(v.dtype):      # kept as its uint16 bits, named in the manifest
                    v, dtype_name = v.view(np.uint16), BF16_NAME
                if v.dtype.hasobject or v.dtype.kind not in "biufc":
                    raise TypeError(f"state {key!r} of parameter {i} has unsupported dtype "
                                    f"{v.dtype}")
                k = f"state/{i}/{key}"
                arrays[k] = v
                manifest.append({"key": k, "index": i, "name": key, "dtype": dtype_name,
                                 "shape": list(v.shape), "sha256": _digest(v)})
            else:
                scalars.append({"index": i, "name": key,
                                "value": _enc(v, f"state[{i}][{key!r}]")})
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "optimizer": name,
        "state_dict": _enc({k: v for k, v in sd.items() if k != "state"}, "state_dict"),
        "state_index": index,
        "scalars": scalars,
        "arrays": manifest,
        "scheduler": None if scheduler is None else {
            "class": type(scheduler).__name__,
            "state_dict": _enc(scheduler.state_dict(), "scheduler.state_dict()")},
        "extra": None if extra is None else _enc(extra, "extra"),
    }
    return header, arrays


def _default_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory):
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, arrays):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = _default_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def save(path, optimizer, scheduler=None, extra=None):
    """Write ``optimizer``'s state (and ``scheduler``'s, and ``extra``) to ``path``.

    ``path`` is used as given (no ``.npz`` is appended).  ``extra`` is a dict of
    JSON-able values (nested dicts, lists, tuples, numbers, strings, None) returned
    by :func:`load`.  Unsupported values raise ``TypeError`` before the file is
    touched.  The parameters themselves are not saved (they belong to the model).
    """
    path = os.fspath(path)
    header, arrays = _build(optimizer, scheduler, extra)
    blob = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    arrays = dict(arrays)
    arrays[HEADER_KEY] = np.frombuffer(blob, dtype=np.uint8)
    _atomic_write(path, arrays)


# --------------------------------------------------------------------------- load

class _Invalid(Exception):
    pass


def _read(path):
    """(header, {key: array}) from the file; _Invalid / other errors on bad files."""
    with np.load(path, allow_pickle=False) as npz:
        if not hasattr(npz, "files"):
            raise _Invalid("not an .npz archive")
        names = list(npz.files)
        if HEADER_KEY not in names:
            raise _Invalid("no __header__ entry")
        raw = npz[HEADER_KEY]
        arrays = {k: npz[k] for k in names if k != HEADER_KEY}
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _Invalid("__header__ is not a uint8 vector")
    header = json.loads(raw.tobytes().decode("utf-8"))
    if not isinstance(header, dict):
        raise _Invalid("the header is not a JSON object")
    return header, arrays


def _check(header, arrays, expected_name):
    if header.get("format") != FORMAT:
        raise _Invalid(f"format {header.get('format')!r} is not {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise _Invalid(f"unsupported format version {header.get('format_version')!r} "
                       f"(this fastopt reads version {FORMAT_VERSION})")
    if header.get("optimizer") != expected_name:
        raise _Invalid(f"checkpoint is for optimizer {header.get('optimizer')!r}, "
                       f"not {expected_name!r}")
    manifest = header.get("arrays")
    if not isinstance(manifest, list):
        raise _Invalid("the header has no array manifest")
    listed = {}
    for m in manifest:
        if not isinstance(m, dict) or set(m) != {"key", "index", "name", "dtype", "shape",
                                                  "sha256"}:
            raise _Invalid("malformed array manifest entry")
        listed[m["key"]] = m
    if len(listed) != len(manifest) or set(listed) != set(arrays):
        missing = sorted(set(listed) - set(arrays))
        unexpected = sorted(set(arrays) - set(listed))
        raise _Invalid(f"the arrays do not match the manifest: missing {missing}, "
                       f"unexpected {unexpected}")
    for k, m in listed.items():
        a = arrays[k]
        bf16 = m["dtype"] == BF16_NAME
        if (a.dtype != np.uint16 if bf16 else np.dtype(m["dtype"]) != a.dtype) \
                or list(a.shape) != list(m["shape"]):
            raise _Invalid(f"array {k!r} is {a.dtype}{list(a.shape)}, the manifest says "
                           f"{m['dtype']}{m['shape']}")
        if _digest(a) != m["sha256"]:
            raise _Invalid(f"array {k!r} fails its SHA-256 checksum")
    for key in ("state_dict", "state_index", "scalars"):
        if key not in header:
            raise _Invalid(f"the header has no {key!r}")
    sd = _dec(header["state_dict"])
    if not isinstance(sd, dict) or "param_groups" not in sd:
        raise _Invalid("the header's state_dict has no param_groups")
    state = {}
    for i in header["state_index"]:
        if isinstance(i, bool) or not isinstance(i, int) or i in state:
            raise _Invalid(f"bad parameter index {i!r} in state_index")
        state[i] = {}
    for s in header["scalars"]:
        if s.get("index") not in state:
            raise _Invalid(f"scalar state for unknown parameter {s.get('index')!r}")
        state[s["index"]][s["name"]] = _dec(s["value"])
    for k, m in listed.items():
        if m["index"] not in state:
            raise _Invalid(f"array {k!r} belongs to unknown parameter {m['index']!r}")
        a = arrays[k]
        if m["dtype"] == BF16_NAME:
            a = a.view(bf16_dtype())    # imports ml_dtypes (ImportError without it)
        state[m["index"]][m["name"]] = a
    sd["state"] = state
    return sd


def load(path, optimizer, scheduler=None):
    """Load a :func:`save` checkpoint into ``optimizer`` (and ``scheduler``).

    Returns the saved ``extra`` dict (``{}`` when none was saved).  Raises
    ``FileNotFoundError`` for a missing file, ``ValueError`` (with the path) for a
    file that is not a valid, intact checkpoint for this optimizer/scheduler, and
    whatever ``optimizer.load_state_dict`` raises for shape/dtype/structure
    mismatches; in every case the optimizer and scheduler are left unchanged.
    Construct the scheduler before loading (as with torch), so that its
    construction does not overwrite the loaded learning rates.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    rule = getattr(optimizer, "rule", None)
    native = rule is not None and hasattr(optimizer, "_capture")
    if native:      # no state_dict() here: in exact mode it would flush pending rows
        expected = rule.name
    else:
        expected = optimizer.state_dict().get("optimizer", type(optimizer).__name__)
    try:
        header, arrays = _read(path)
        sd = _check(header, arrays, expected)
        sched = header.get("scheduler")
        if scheduler is not None:
            if not isinstance(sched, dict) or "state_dict" not in sched:
                raise _Invalid("a scheduler was given but the checkpoint has no scheduler state")
            if sched.get("class") != type(scheduler).__name__:
                raise _Invalid(f"checkpoint has scheduler {sched.get('class')!r}, "
                               f"not {type(scheduler).__name__!r}")
            sched_sd = _dec(sched["state_dict"])
        extra = header.get("extra")
        extra = {} if extra is None else _dec(extra)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # corrupted, truncated, foreign or mismatched file
        raise ValueError(f"{path!r} is not a valid fastopt checkpoint for this "
                         f"{expected} optimizer: {e}") from e
    # a non-flushing copy to roll back to (taking a state_dict() here would bring
    # pending exact-mode rows up to date: a refused load must change nothing)
    current = None
    if scheduler is not None:
        current = optimizer._capture() if native else optimizer.state_dict()
    optimizer.load_state_dict(sd)          # atomic: checks everything, then commits
    if scheduler is not None:
        try:
            scheduler.load_state_dict(sched_sd)
        except BaseException:
            if native:
                optimizer._restore(current)
            else:
                optimizer.load_state_dict(current)
            raise
    return extra
