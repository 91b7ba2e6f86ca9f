"""The layering rule of docs/DESIGN.md: the library never imports the applications built on it.

Library: every module of ``dsc_jax`` outside the applications (layers, models, bank, NNX faces,
loading, generation, sharding, data, the paper's numbers, timing, private helpers).
Applications: the trainer (``dsc_jax.train``), the experiment runner (``dsc_jax.experiments``)
and the command lines (``dsc_jax.cli``, ``dsc_jax.sample_cli``, ``dsc_jax.console``).
Benchmarks (``benchmarks/``) import the library, and of the trainer only the pure step and
its state (``dsc_jax.train.steps``, ``dsc_jax.train.state``), which they time. Imports are read
with ``ast`` (function-level and ``TYPE_CHECKING`` imports included), so nothing is executed.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dsc_jax"
APPLICATIONS = (
    "dsc_jax.train",
    "dsc_jax.experiments",
    "dsc_jax.cli",
    "dsc_jax.sample_cli",
    "dsc_jax.console",
)

#: Library modules that import an application today, with the import that breaks the rule.
KNOWN_LIBRARY_VIOLATIONS: dict[str, str] = {}
#: Benchmarks that import an application today.
KNOWN_BENCHMARK_VIOLATIONS: dict[str, str] = {}
#: What a benchmark may import from the trainer: the pure training step it times.
BENCHMARK_MAY_IMPORT = ("dsc_jax.train.steps", "dsc_jax.train.state")


def module_name(path: pathlib.Path) -> str:
    """``dsc_jax/layers/dsc.py`` -> ``dsc_jax.layers.dsc`` (``__init__`` -> the package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool) -> set[str]:
    """Every module ``source`` (the module ``name``) imports, relative imports resolved;
    ``from a import b`` counts as importing ``a`` and ``a.b``."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def application_imports(path: pathlib.Path) -> list[str]:
    """The application modules ``path`` imports, sorted."""
    names = imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")
    return sorted(n for n in names if is_application(n))


def is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATIONS)


def _cases(paths: list[pathlib.Path], known: dict[str, str]) -> list:
    cases = []
    for path in sorted(paths):
        name = module_name(path)
        marks = [pytest.mark.xfail(strict=True, reason=known[name])] if name in known else []
        cases.append(pytest.param(path, id=name, marks=marks))
    return cases


LIBRARY = [p for p in PACKAGE.rglob("*.py") if not is_application(module_name(p))]
BENCHMARKS = list((REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", _cases(LIBRARY, KNOWN_LIBRARY_VIOLATIONS))
def test_library_module_imports_no_application(path: pathlib.Path) -> None:
    assert application_imports(path) == []


@pytest.mark.parametrize("path", _cases(BENCHMARKS, KNOWN_BENCHMARK_VIOLATIONS))
def test_benchmark_imports_only_the_library(path: pathlib.Path) -> None:
    def allowed(name: str) -> bool:  # the module, or a name imported from it
        return name == "dsc_jax.train" or any(
            name == ok or name.startswith(ok + ".") for ok in BENCHMARK_MAY_IMPORT
        )

    assert [n for n in application_imports(path) if not allowed(n)] == []


def test_known_violations_name_existing_modules() -> None:
    """A module that was moved or renamed must leave the known-violation lists too."""
    names = {module_name(p) for p in [*LIBRARY, *BENCHMARKS]}
    assert set(KNOWN_LIBRARY_VIOLATIONS) | set(KNOWN_BENCHMARK_VIOLATIONS) <= names


def test_the_checker_sees_every_form_of_import() -> None:
    """Absolute, ``from`` and relative imports, also inside a function, are all found."""
    cases = [  # (source, importing module, is a package, application imports found)
        ("import dsc_jax.train.config\n", "dsc_jax.layers.x", False, ["dsc_jax.train.config"]),
        ("from dsc_jax import cli\n", "dsc_jax.layers.x", False, ["dsc_jax.cli"]),
        (
            "def f():\n    from ..experiments import runner\n",
            "dsc_jax.layers.x",
            False,
            ["dsc_jax.experiments", "dsc_jax.experiments.runner"],
        ),
        ("from . import train\n", "dsc_jax", True, ["dsc_jax.train"]),
        ("from . import train\n", "dsc_jax.layers.x", False, []),  # dsc_jax.layers.train
        ("import dsc_jax.trainer_like\nfrom dsc_jax.layers import dsc\n", "dsc_jax.x", False, []),
    ]
    for source, name, is_package, expected in cases:
        names = imported_modules(source, name, is_package)
        assert sorted(n for n in names if is_application(n)) == expected, source
    assert module_name(PACKAGE / "layers" / "__init__.py") == "dsc_jax.layers"
