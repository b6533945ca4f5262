"""The shape of moe/ that the README promises: moe modules imported at module level (except where a
command defers its heavy third-party stack), rooms of at most ~450 lines, functions of at most ~80.
The layering itself is import-linter's contract (setup.cfg [importlinter], run by `make lint`)."""
import ast
import os

from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "moe")
# where a moe import inside a function is deliberate: each CLI command imports its own stack (torch,
# DeepSpeed, matplotlib) so `moe --help` stays fast; the compiled extension is optional
DEFERRED_IMPORTS_ALLOWED = {"moe/cli/commands.py"}
OPTIONAL_EXTENSION = "moe._C"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, ROOT), ast.parse(open(path).read())


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_moe_modules_are_imported_at_module_level():
    inner = []
    for rel, tree in _modules():
        if rel in DEFERRED_IMPORTS_ALLOWED:
            continue
        for fn in _functions(tree):
            for node in ast.walk(fn):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                inner += [f"{rel}:{node.lineno} {n}" for n in names
                          if (n == "moe" or n.startswith("moe.")) and n != OPTIONAL_EXTENSION]
    assert not inner, "moe imports inside functions (move them to the top of the module):\n" + "\n".join(inner)


def test_rooms_and_functions_stay_small():
    big = []
    for rel, tree in _modules():
        lines = max((getattr(n, "end_lineno", 0) or 0) for n in ast.walk(tree))
        if lines > MAX_MODULE_LINES:
            big.append(f"{rel}: {lines} lines")
        big += [f"{rel}:{fn.lineno} {fn.name}: {fn.end_lineno - fn.lineno + 1} lines" for fn in _functions(tree)
                if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not big, "split these by what they do:\n" + "\n".join(big)


def test_every_module_has_a_unit_test_file_or_is_covered_by_its_package_test():
    """tests/unit mirrors moe/: moe/a/b.py is tested in tests/unit/a/test_b.py."""
    missing = []
    for rel, _ in _modules():
        folder, name = os.path.split(os.path.relpath(rel, "moe"))
        if name == "__init__.py" or name == "__main__.py":
            continue
        if not os.path.isfile(os.path.join(ROOT, "tests", "unit", folder, f"test_{name}")):
            missing.append(rel)
    assert not missing, "no unit test file for:\n" + "\n".join(sorted(missing))
