"""Write docs/API.md from the docstrings: ``python docs/gen_api.py`` (``--check``: exit 1 when
the file is stale instead of writing it).

Every name in the ``__all__`` of :data:`MODULES` gets a section with its kind, signature and
docstring summary (first paragraph); Flax modules also get their call signature and summary.
Constants have no runtime docstring: their text is the string literal right after their
assignment in the defining module, else the ``#`` comment block right above it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import sys
from typing import Any

import flax.linen as nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "API.md"
MODULES = ("dsc_jax", "dsc_jax.layers", "dsc_jax.models", "dsc_jax.generate", "dsc_jax.loading")
HEADER = """# API reference

Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand
(`tests/test_api_docs.py` fails when this file is stale). Every name below is in its
module's `__all__`; a name exported by several modules is described at its first entry.
"""


def summary(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    paragraph = (inspect.cleandoc(doc or "").split("\n\n") or [""])[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def usage(doc: str | None) -> list[str]:
    """The ``Shapes``/``Example`` paragraphs of a docstring, ``::`` blocks as Python code."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    out, take_code = [], False
    for paragraph in paragraphs:
        if take_code and paragraph.startswith(" "):
            out += ["```python", inspect.cleandoc(paragraph), "```", ""]
            continue
        take_code = False
        if paragraph.startswith(("Shapes", "Example", "Incremental")):
            text = " ".join(line.strip() for line in paragraph.splitlines())
            take_code = text.endswith("::")
            out += [text[:-1] if take_code else text, ""]
    return out


def constant_doc(name: str) -> str:
    """Docstring of a module-level constant ``name``: the string after its assignment, else
    the comment block above it, searched in every module of the package."""
    for path in sorted((ROOT / "dsc_jax").rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        lines = source.splitlines()
        for i, node in enumerate(tree.body):
            targets = (
                node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            )
            if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
                continue
            after = tree.body[i + 1] if i + 1 < len(tree.body) else None
            value = getattr(after, "value", None) if isinstance(after, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
            comments, j = [], node.lineno - 2
            while j >= 0 and lines[j].lstrip().startswith("#"):
                comments.insert(0, lines[j].lstrip()[1:].strip())
                j -= 1
            if comments:
                return " ".join(comments)
    return ""


def kind_of(obj: Any) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "Flax module" if issubclass(obj, nn.Module) else "class"
    if callable(obj) and hasattr(obj, "__code__"):
        return "function"
    return "constant"


def signature(name: str, obj: Any) -> str:
    try:
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            fields = [f for f in obj.__dataclass_fields__ if f not in ("parent", "name")]
            return f"{name}({', '.join(fields)})"
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def describe(module_name: str, name: str, obj: Any) -> list[str]:
    kind = kind_of(obj)
    out = [f"### `{module_name}.{name}` ({kind})", ""]
    if kind == "constant":
        out += [summary(constant_doc(name)) or "(undocumented)", ""]
        return out
    if kind != "module":
        out += ["```python", signature(name, obj), "```", ""]
    out += [summary(obj.__doc__) or "(undocumented)", ""]
    if kind == "Flax module":
        out += usage(obj.__doc__)
        call = obj.__call__
        out += [f"Call: `{signature('__call__', call)}` — {summary(call.__doc__)}", ""]
    return out


def render() -> str:
    """The whole of docs/API.md."""
    sys.path.insert(0, str(ROOT))
    out, seen = [HEADER], {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        out += [f"## `{module_name}`", "", summary(module.__doc__), ""]
        for name in sorted(module.__all__, key=str.lower):
            obj = getattr(module, name)
            first = seen.get(id(obj)) if not isinstance(obj, int | str | tuple | dict) else None
            if first is not None:
                out += [f"### `{module_name}.{name}`", "", f"Same object as `{first}`.", ""]
                continue
            seen[id(obj)] = f"{module_name}.{name}"
            out += describe(module_name, name, obj)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    text = render()
    if "--check" in sys.argv[1:]:
        stale = not OUTPUT.exists() or OUTPUT.read_text() != text
        sys.exit(f"{OUTPUT} is stale; run python docs/gen_api.py" if stale else 0)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
