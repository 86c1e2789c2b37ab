"""The configuration reference (docs/config.md), generated from ``pipeline/config.py``: every section and key of
``JobConfig``, its type or allowed values, its default, and the comments written beside it in config.py.

    python -m pipeline.tools.config_reference > docs/config.md

``tests/unit/test_config_reference.py`` keeps the page equal to what this prints, so it cannot drift from the
code. The comments are read with ``tokenize`` (the comment on a field's line, the comment lines right above it
and those continuing below it); pydantic holds the types, defaults and bounds.
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import tokenize
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from pipeline import config as config_module

HEADER = """# Configuration reference

Generated from `pipeline/config.py` by `python -m pipeline.tools.config_reference > docs/config.md` (a test keeps
the two equal). Every job reads one YAML file of these sections; `--set section.key=value` overrides a key (the
value parsed as YAML). Unknown keys and wrong types are errors (strict: `"10"` is not a number, `yes` is not a
boolean); `storage_options` never take credentials (they come from the environment).
"""


def field_comments(cls: type) -> dict[str, str]:
    """``{field: its comments}`` for one class of config.py, read from the source."""
    source = inspect.getsource(config_module)
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    fields = [n for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    out = {}
    for f in fields:
        start, end = f.lineno, f.end_lineno or f.lineno
        parts = []
        above = start - 1
        block = []
        while above in comments and above not in code_lines:  # comment-only lines right above
            block.insert(0, comments[above])
            above -= 1
        parts += block
        parts += [comments[n] for n in range(start, end + 1) if n in comments]
        out[f.target.id] = " ".join(p for p in parts if p and not p.startswith("noqa"))
    return out


def type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin in (list, dict):
        args = ", ".join(type_text(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    return getattr(annotation, "__name__", str(annotation))


def bounds(info) -> str:
    out = []
    for m in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            out.append(f"matching `{m.pattern}`")
    return ", ".join(out)


def default_text(info) -> str:
    if info.is_required():
        return "—"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_rows(prefix: str, model: type[BaseModel]) -> list[str]:
    notes = field_comments(model)
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += section_rows(f"{prefix}{name}.", annotation)
            continue
        kind = type_text(annotation)
        limit = bounds(info)
        rows.append(f"| `{prefix}{name}` | {cell(kind + (f' ({limit})' if limit else ''))} | {cell(default_text(info))} "
                    f"| {cell(notes.get(name, ''))} |")
    return rows


def reference() -> str:
    lines = [HEADER]
    for name, info in config_module.JobConfig.model_fields.items():
        model = info.annotation
        doc = inspect.cleandoc(model.__dict__.get("__doc__") or "")  # its own, not one inherited from pydantic
        lines += [f"## `{name}`", ""]
        if doc:
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | type | default | notes |", "| --- | --- | --- | --- |", *section_rows(f"{name}.", model), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
