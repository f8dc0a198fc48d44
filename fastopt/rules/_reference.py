"""Helpers of the NumPy references (each rule module holds its own reference).

The references are written from torch.optim's documented algorithms and are
independent of the element math: bias corrections are computed from
``beta ** step`` there, not taken from the host scalars, so they serve as the
oracle.  Signature of every reference::

    reference(param, grad, state, group, step, fresh=())

``param`` is updated in place, ``grad`` is read only; ``state`` holds the state
arrays this configuration uses (updated in place) and host scalars (NAdam's
``mu_product``, replaced in the dict); ``step`` counts from 1; ``fresh`` names the
state created for this step (SGD's momentum buffer starts as the gradient).
Arithmetic stays in the parameter's dtype (NumPy 2 keeps float32 when combined
with Python floats).
"""


def signed_grad(grad, group):
    return -grad if group.get("maximize", False) else grad


def l2(g, param, weight_decay):
    return g + weight_decay * param if weight_decay != 0 else g
