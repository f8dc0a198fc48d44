"""A griffe extension for the API reference (mkdocs.yml).

fastopt's docstrings are written for Sphinx and ``help()``; this adapts them to the
Markdown site, without changing the source:

* ``:role:`target``` and ``:role:`~a.b.name``` (``:class:``, ``:func:``, ``:mod:``,
  ...) become inline code (```target```, ```name```): plain code, not
  cross-references, so a target the reference does not document is not a broken
  link (nor a warning under ``mkdocs build --strict``);
* a paragraph ending in ``::`` ends in ``:`` (the indented block after it is already
  a Markdown code block), and a line that is only ``::`` is dropped;
* the optimizer classes of ``fastopt.optimizers``, generated at run time from the
  rule registry (static analysis sees none), are read by importing the module
  (:class:`GeneratedClasses`; ``fastopt`` imports without its compiled extensions);
* a class whose docstring is assigned at run time (``__doc__ = "..." + _CONSTANT``,
  as ``fastopt.torch`` does; static analysis sees no docstring) gets that text when
  the expression is made of string literals, ``+`` and module-level string
  constants; anything else is left without a docstring.
"""

import ast
import inspect
import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|mod|func|meth|data|attr|exc|obj):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)\s*::[ \t]*$", re.M)
_BARE = re.compile(r"^[ \t]*::[ \t]*$", re.M)


def _role(match):
    short, target = match.group(1), match.group(2).strip()
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"``{target}``"


def convert(text):
    """The Markdown-friendly form of a Sphinx-style docstring (see the module docstring)."""
    text = _ROLE.sub(_role, text)
    text = _BARE.sub("", text)
    return _LITERAL.sub(r"\1:", text)


def _string(expr, module, depth=0):
    """The value of a string expression of literals, ``+`` and module-level names,
    or None."""
    if depth > 5:
        return None
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None

    def value(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            return n.value
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add):
            left, right = value(n.left), value(n.right)
            return None if left is None or right is None else left + right
        if isinstance(n, ast.Name):
            member = module.members.get(n.id)
            if isinstance(member, griffe.Attribute) and member.value is not None:
                return _string(str(member.value), module, depth + 1)
        return None

    return value(node)


class RstRoles(griffe.Extension):
    """Adapt every docstring of every loaded object (see the module docstring)."""

    def on_object(self, *, obj, **kwargs):
        if obj.docstring is None and obj.is_class:
            assigned = obj.members.get("__doc__")
            if isinstance(assigned, griffe.Attribute) and assigned.value is not None:
                text = _string(str(assigned.value), obj.module)
                if text:
                    obj.docstring = griffe.Docstring(inspect.cleandoc(text), parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)


class GeneratedClasses(griffe.Extension):
    """The classes ``fastopt.optimizers`` generates from the registry (``CLASSES``),
    inspected at run time and added to the statically loaded module."""

    def on_module_members(self, *, mod, **kwargs):
        if mod.path != "fastopt.optimizers":
            return
        import importlib
        names = list(importlib.import_module("fastopt.optimizers").CLASSES)
        inspected = griffe.inspect("fastopt.optimizers", extensions=griffe.load_extensions(
            RstRoles))
        for name in names:
            obj = inspected[name]
            for member in [m for m in obj.members if m != "__init__"]:
                obj.del_member(member)           # `rule`: a repr, not documentation
            obj.parent = mod
            mod.set_member(name, obj)
