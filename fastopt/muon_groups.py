"""Splitting a model's parameters between Muon and AdamW.

Muon orthogonalizes matrices: it is meant for the *hidden* weight matrices (linear
layers, convolution kernels seen as ``[out, in, kh, kw]`` stacks... ); vectors
(biases, norm gains) cannot be given to it, and the embedding table and the output
head are usually trained with AdamW (Jordan et al.; Moonshot's "Muon is Scalable").
:func:`muon_param_groups` makes the two lists::

    import torch, fastopt.torch
    muon, adamw = fastopt.muon_param_groups(model.named_parameters())
    opt_muon = fastopt.torch.Muon(muon, lr=0.02)
    opt_adamw = fastopt.torch.AdamW(adamw, lr=3e-4, weight_decay=0.01)

It takes what ``named_parameters()`` gives (pairs ``(name, tensor)``), a dict
name -> array, or a plain list of arrays (no names: only the shape rule applies).
"""

import fnmatch

#: name patterns (fnmatch, matched against the lower-cased name) of the matrices that
#: go to AdamW by default: embedding tables and output heads
DEFAULT_ADAMW_PATTERNS = ("*embed*", "*wte*", "*wpe*", "*tok_emb*", "*pos_emb*",
                          "*lm_head*", "*head.weight", "*classifier*", "*output.weight")


def muon_param_groups(params, adamw_patterns=DEFAULT_ADAMW_PATTERNS, *, min_ndim=2,
                      named=False):
    """Split parameters into ``(muon, adamw)`` lists.

    Args:
        params: ``model.named_parameters()`` (pairs ``(name, tensor)``), a dict
            name -> array, or a list of arrays/tensors.
        adamw_patterns: name patterns (``fnmatch``, case-insensitive) of matrices sent
            to AdamW anyway (default: embeddings and output heads,
            :data:`DEFAULT_ADAMW_PATTERNS`); ``()`` sends every matrix to Muon.
        min_ndim: parameters with fewer dimensions go to AdamW (2: vectors and
            scalars; Muon refuses them).
        named: return ``(name, param)`` pairs (names are ``"0"``, ``"1"``, ... for a
            plain list) instead of the parameters alone.

    Parameters with ``requires_grad`` False (frozen torch tensors) are left out of
    both lists.  Every other parameter is in exactly one list, in the given order.
    """
    if isinstance(params, dict):
        pairs = list(params.items())
    else:
        items = list(params)
        if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                         for x in items):
            pairs = items
        else:
            pairs = [(str(k), x) for k, x in enumerate(items)]
            adamw_patterns = ()          # no names: the shape rule alone
    if int(min_ndim) < 2:
        raise ValueError(f"min_ndim={min_ndim!r}: Muon takes parameters of ndim >= 2 only")
    muon, adamw = [], []
    for name, p in pairs:
        if getattr(p, "requires_grad", True) is False:
            continue
        low = name.lower()
        to_adamw = len(p.shape) < min_ndim or any(
            fnmatch.fnmatchcase(low, pat.lower()) for pat in adamw_patterns)
        (adamw if to_adamw else muon).append((name, p) if named else p)
    return muon, adamw


__all__ = ["muon_param_groups", "DEFAULT_ADAMW_PATTERNS"]
