"""The documentation agrees with the code and with itself.

* the generated blocks of README.md and docs/ (the rule x backend x feature table,
  the benchmark tables) equal what ``tools/readme_tables.py`` generates now;
* every local link of README.md, CONTRIBUTING.md and CHANGELOG.md points to a file
  that exists, every page of mkdocs.yml's ``nav`` exists and every docs page is in it;
* the README's test command is the one ``.ci/run`` pastes, and the README names every
  optional extra of pyproject.toml;
* the Python blocks of README.md and docs/*.md compile, the README sections the
  docs site includes exist, and every ``:::`` target of the API reference exists.

The site itself is built by CI (``mkdocs build --strict``), not here.  These checks
read files and import nothing optional; the docs tree is not in the sdist, so they
skip there.
"""

import ast
import importlib.util
import os
import re

import pytest

import fastopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "readme_tables.py")

if not (os.path.exists(os.path.join(ROOT, "mkdocs.yml")) and os.path.exists(TOOL)):
    pytest.skip("no docs tree here (mkdocs.yml, tools/: an unpacked sdist?)",
                allow_module_level=True)


def read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def docs_pages():
    return sorted(f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def load_tool():
    spec = importlib.util.spec_from_file_location("readme_tables", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_tables_are_current():
    stale = load_tool().stale()
    assert not stale, ("stale generated blocks (run python tools/readme_tables.py "
                       "--write):\n" + "\n\n".join(d for _, _, d in stale))


def test_capability_table_covers_every_rule_and_backend():
    tool = load_tool()
    table = tool.capability_table()
    from fastopt import backends, rules
    for name in rules.RULES:
        assert f"| `fastopt.{name}`" in table
    # declared classes, not what this machine has: cuda is listed without numba-cuda
    assert list(tool.backend_classes()) == [n for n in backends.KNOWN if n != "auto"]


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"])
def test_local_links_exist(doc):
    missing = []
    for target in _LINK.findall(read(doc)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not os.path.exists(os.path.join(ROOT, path)):
            missing.append(target)
    assert not missing, f"{doc} links to missing files: {missing}"


def test_readme_links_every_guide():
    readme = read("README.md")
    for page in docs_pages():
        if page != "index.md":          # the site's home page, made from README.md
            assert f"(docs/{page})" in readme, f"README.md does not link docs/{page}"


def nav_pages():
    """The ``.md`` files of mkdocs.yml's nav (a line scan: no YAML parser needed)."""
    pages, in_nav = [], False
    for line in read("mkdocs.yml").splitlines():
        if re.match(r"nav:\s*$", line):
            in_nav = True
        elif in_nav and line and not line[0].isspace() and not line.startswith("#"):
            break
        elif in_nav:
            m = re.search(r"(\S+\.md)\s*$", line)
            if m:
                pages.append(m.group(1))
    return pages


def test_mkdocs_nav_pages_exist():
    pages = nav_pages()
    assert "index.md" in pages and "api.md" in pages
    missing = [p for p in pages if not os.path.exists(os.path.join(ROOT, "docs", p))]
    assert not missing, f"mkdocs.yml nav lists missing pages: {missing}"
    orphans = sorted(set(docs_pages()) - set(pages))
    assert not orphans, f"docs pages missing from mkdocs.yml nav: {orphans}"


def test_readme_test_command_is_the_one_ci_pastes():
    pasted = [line[len("#   "):] for line in read(".ci", "run").splitlines()
              if line.startswith("#   python3 -m venv")]
    assert len(pasted) == 1, ".ci/run no longer pastes the README's test command"
    lines = read("README.md").splitlines()
    assert "    " + pasted[0] in lines, "README.md's test command differs from .ci/run's"
    bench = ('    python3 -m venv .venv && . .venv/bin/activate && pip install ".[bench]" '
             '&& fastopt bench')
    assert bench in lines


def test_readme_names_every_extra():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    readme = read("README.md")
    missing = [e for e in extras if f"| `{e}` |" not in readme]
    assert not missing, f"README.md's extras table lacks {missing}"


_PY_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("doc", ["README.md"] + [f"docs/{p}" for p in docs_pages()])
def test_python_blocks_compile(doc):
    for k, block in enumerate(_PY_BLOCK.findall(read(doc))):
        compile(block, f"{doc} block {k}", "exec")


def test_included_readme_sections_exist():
    readme = read("README.md")
    for page in docs_pages():
        for name in re.findall(r'^--8<-- "README\.md:([\w-]+)"', read("docs", page), re.M):
            for edge in ("start", "end"):
                assert f"<!-- --8<-- [{edge}:{name}] -->" in readme, \
                    f"docs/{page} includes README section {name!r}, which has no {edge} marker"


def test_api_reference_targets_exist():
    """Every ``::: dotted.name`` of docs/api.md names a module or an attribute of one
    (found in the source, without importing the optional fastopt.torch and
    fastopt.distributed)."""
    targets = re.findall(r"^::: ([\w.]+)", read("docs", "api.md"), re.M)
    assert targets
    for target in targets:
        parts = target.split(".")
        path = os.path.join(ROOT, *parts)
        if os.path.exists(path + ".py") or os.path.exists(os.path.join(path, "__init__.py")):
            continue
        module, name = os.path.join(ROOT, *parts[:-1]), parts[-1]
        source = module + ".py" if os.path.exists(module + ".py") else \
            os.path.join(module, "__init__.py")
        assert os.path.exists(source), f"docs/api.md: no module for {target}"
        tree = ast.parse(read(source))
        defined = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                defined.add(node.name)
            elif isinstance(node, ast.ImportFrom):
                defined.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Assign):
                defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        if target.startswith("fastopt.optimizers."):    # generated from the registry
            defined.update(fastopt.CLASSES)
        assert name in defined, f"docs/api.md: {target} is not defined in {source}"
