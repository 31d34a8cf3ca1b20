"""Reference pages generated from the code when the documentation is built, never typed by hand.

- ``san-model``: a pydantic model's fields, section by section — types, defaults and bounds from its JSON schema
  (the one the API validates with), each field's description from the comment beside it in the source.
- ``san-openapi``: the REST API from the service's own OpenAPI document (``service.app.create_app().openapi()``:
  the API process imports no torch, and neither does this).
- ``paper-claims``: for a study's ``table.md`` (written by ``san study run``) and its preset, whether each module's
  difference to the base model has the paper's sign on every seed — the rule the results pages state.
"""

import importlib
import inspect
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any, ClassVar, get_args

from docutils.parsers.rst import directives
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _cell(text: str) -> str:
    """One line of a list-table cell."""
    return " ".join(str(text).split()) or " "


def _prose(text: str) -> str:
    """A source comment as RST text: its ``*``, ``|`` and trailing ``_`` literal; its `names` kept as they are."""
    text = text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|")
    return re.sub(r"(\w)_(?=\W|$)", r"\1\\_", text)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the comment lines right above it and the one at its end."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    body_indent = None
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    by_line: dict[int, list[tokenize.TokenInfo]] = {}
    for token in tokens:
        by_line.setdefault(token.start[0], []).append(token)
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if number == 1 or not stripped:
            above = []
            continue
        if body_indent is None:
            body_indent = indent
        if indent != body_indent:
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and not stripped.startswith(("def ", "class ", "@")):
            trailing = [t.string.lstrip("#").strip() for t in by_line.get(number, []) if t.type == tokenize.COMMENT]
            text = " ".join([*above, *trailing]).strip()
            text = re.sub(r"\s*\(?fmt: skip\)?$", "", text)
            if text:
                comments[match[1]] = text
        above = []
    return comments


def schema_type(prop: dict[str, Any]) -> str:
    """A JSON-schema property's type as a reader writes it: ``int``, ``"a" | "b"``, ``list[str]``, ``Section``."""
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "const" in prop:
        return json.dumps(prop["const"])
    if "enum" in prop:
        return " | ".join(json.dumps(value) for value in prop["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in prop:
            return " | ".join(schema_type(option) for option in prop[key])
    kind = prop.get("type")
    if kind == "array":
        return f"list[{schema_type(prop.get('items', {}))}]" if prop.get("items") else "list"
    if kind == "object":
        extra = prop.get("additionalProperties")
        return f"dict[str, {schema_type(extra)}]" if isinstance(extra, dict) and extra else "object"
    names = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}
    return names.get(kind, kind or "any")


BOUNDS = {
    "minimum": "≥",
    "maximum": "≤",
    "exclusiveMinimum": ">",
    "exclusiveMaximum": "<",
    "minLength": "length ≥",
    "maxLength": "length ≤",
    "minItems": "items ≥",
    "maxItems": "items ≤",
}


def bounds(prop: dict[str, Any]) -> str:
    found = []
    for option in [prop, *prop.get("anyOf", [])]:
        found += [f"{word} {option[key]}" for key, word in BOUNDS.items() if key in option]
        if "pattern" in option:
            found.append(f"pattern ``{option['pattern']}``")
    return ", ".join(found)


def default_text(field: Any) -> str:
    if field.default_factory is not None:
        factory = field.default_factory
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return "its defaults"
        if factory in (dict, list):
            return f"``{factory()!r}``"
        return f"``{getattr(factory, '__name__', factory)}()``"
    if field.default is PydanticUndefined:
        return "required"
    if field.default == sys.executable:
        return "the running interpreter"
    value = field.default.value if hasattr(field.default, "value") else field.default
    return f"``{json.dumps(value) if value is None or isinstance(value, bool | str) else repr(value)}``"


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [found for arg in get_args(annotation) for found in nested_models(arg)]


def model_rst(cls: type[BaseModel], path: str, env_prefix: str = "") -> list[str]:
    """A rubric and a list-table for ``cls``, then one for each section model under it."""
    schema = cls.model_json_schema()
    properties = schema.get("properties", {})
    comments = field_comments(cls)
    label = re.sub(r"[^a-z0-9]+", "-", f"{cls.__module__}.{cls.__name__}-{path}".lower()).strip("-")
    lines = [f".. _{label}:", "", f".. rubric:: {path or cls.__name__} — ``{cls.__module__}.{cls.__name__}``", ""]
    doc = inspect.getdoc(cls) if cls.__doc__ else ""
    if doc and "__doc__" in vars(cls):
        lines += [*doc.splitlines(), ""]
    lines += [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 18 22 14 14 32",
        "",
        "   * - field",
        "     - type",
        "     - default",
        "     - bounds",
        "     - meaning",
    ]
    children = []
    for name, field in cls.model_fields.items():
        key = field.alias or name
        prop = properties.get(key, {})
        shown = f"{path}.{key}" if path else key
        if env_prefix:
            shown = f"{env_prefix}{key.upper()}"
        nested = nested_models(field.annotation)
        meaning = _prose(comments.get(name) or field.description or prop.get("description", ""))
        if nested:
            children += [(model, f"{path}.{key}" if path else key) for model in nested]
            meaning = (
                (meaning + " " if meaning else "")
                + f"Section: see :ref:`{shown} <"
                + re.sub(r"[^a-z0-9]+", "-", f"{nested[0].__module__}.{nested[0].__name__}-{shown}".lower()).strip("-")
                + ">`."
            )
        lines += [
            f"   * - ``{shown}``",
            f"     - ``{_cell(schema_type(prop))}``",
            f"     - {_cell(default_text(field))}",
            f"     - {_cell(bounds(prop))}",
            f"     - {_cell(meaning)}",
        ]
    lines.append("")
    for model, child_path in children:
        lines += model_rst(model, child_path)
    return lines


class ModelFields(SphinxDirective):
    """``.. san-model:: training.config.JobSpec`` (``:env-prefix: SAN_`` for a settings class)."""

    required_arguments = 1
    option_spec: ClassVar = {"env-prefix": directives.unchanged}

    def run(self):
        cls = _import(self.arguments[0])
        self.env.note_dependency(inspect.getsourcefile(cls))
        lines = model_rst(cls, "", self.options.get("env-prefix", ""))
        return self.parse_text_to_nodes("\n".join(lines), allow_section_headings=False)


def openapi_rst(document: dict[str, Any]) -> list[str]:
    lines = [
        f"*{document['info']['title']}*, version {document['info']['version']} — "
        f"{document['info'].get('description', '')}",
        "",
    ]
    schemas = document.get("components", {}).get("schemas", {})
    used: list[str] = []

    def ref(schema: dict[str, Any]) -> str:
        text = schema_type(schema)
        for name in re.findall(r"\w+", text):
            if name in schemas and name not in used:
                used.append(name)
        return f"``{text}``"

    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            lines += [f".. rubric:: ``{method.upper()} {path}``", ""]
            lines += [operation.get("summary", ""), ""]
            if operation.get("description"):
                lines += [*operation["description"].splitlines(), ""]
            auth = "bearer token" if operation.get("security") else "open"
            lines += [f"- **auth**: {auth}"]
            for parameter in operation.get("parameters", []):
                required = "required" if parameter.get("required") else "optional"
                lines += [
                    f"- **{parameter['in']}** ``{parameter['name']}`` ({required}): "
                    f"{ref(parameter.get('schema', {}))} {_cell(parameter.get('description', ''))}"
                ]
            body = operation.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                lines += [f"- **body** ({media}): {ref(content.get('schema', {}))}"]
            for code, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                shown = ", ".join(ref(c["schema"]) for c in content.values() if c.get("schema")) or ""
                lines += [f"- **{code}**: {_cell(response.get('description', ''))} {shown}".rstrip()]
            lines.append("")
    lines += [
        ".. rubric:: Schemas",
        "",
        "The bodies above, as the OpenAPI document declares them. ``JobSpec`` and ``StudySpec`` are described "
        "field by field, with their sections, in :doc:`jobspec` and :doc:`studyspec`.",
        "",
    ]
    index = 0
    while index < len(used):  # schemas reached from the operations, and the ones they reach
        name = used[index]
        index += 1
        schema = schemas[name]
        lines += [f".. rubric:: ``{name}``", ""]
        if schema.get("description"):
            lines += [_cell(schema["description"]), ""]
        if "enum" in schema:
            lines += ["One of: " + ", ".join(f"``{json.dumps(value)}``" for value in schema["enum"]), ""]
            continue
        properties = schema.get("properties", {})
        if not properties:
            continue
        lines += [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 25 35 40",
            "",
            "   * - field",
            "     - type",
            "     - required",
        ]
        for key, prop in properties.items():
            lines += [
                f"   * - ``{key}``",
                f"     - {ref(prop)}",
                f"     - {'yes' if key in schema.get('required', []) else 'no'}",
            ]
        lines.append("")
    return lines


class OpenAPI(SphinxDirective):
    """``.. san-openapi::``: every operation of the service's OpenAPI document, then the schemas they use."""

    def run(self):
        from service.app import create_app

        document = create_app().openapi()
        for name in ("app", "routes/jobs", "routes/studies", "routes/catalog", "routes/health", "schemas"):
            found = ROOT / "service" / f"{name}.py"
            if found.exists():
                self.env.note_dependency(str(found))
        return self.parse_text_to_nodes("\n".join(openapi_rst(document)), allow_section_headings=False)


# ---- paper claims -----------------------------------------------------------------------------------------------


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in ``text``, as rows of cells (the header first, the ``|---|`` line dropped)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _number(text: str) -> float | None:
    found = re.match(r"[+-]?\d+(\.\d+)?", text.replace("−", "-").strip())
    return float(found[0]) if found else None


def paper_claims(table_md: Path) -> list[str]:
    """Markdown bullets: each cell against the baseline, the paper's sign and ours on every seed."""
    text = table_md.read_text()
    layout, cells = markdown_tables(text)[:2]
    header = layout[0]
    delta_title = next(c for c in cells[0] if c.startswith("Δ "))
    metric = delta_title.split(" vs ")[0].removeprefix("Δ ").strip()  # "top-1", "cos. sim."
    better = cells[0][cells[0].index(delta_title) + 1]  # "Δ > 0" or "Δ < 0"
    sign = 1 if ">" in better else -1
    paper_columns = {
        i: h.rsplit(" paper ", 1)[0] if " paper " in h else ""
        for i, h in enumerate(header)
        if h.lower().endswith(f"paper {metric}".lower())
    }
    paper: dict[tuple[str, str], float] = {}
    for row in layout[1:]:
        for index, column in paper_columns.items():
            value = _number(row[index]) if index < len(row) else None
            if value is not None:
                paper[(row[0], column)] = value

    def paper_of(name: str) -> float | None:
        for (row, column), value in paper.items():
            placements = [p.strip() for p in column.split("=")] if column else [""]
            if name == row or any(name == f"{row} · {p}" for p in placements if p):
                return value
        return None

    base_row = cells[1]
    base_name = re.sub(r"\s*\(c\d+\)$", "", base_row[0])
    base = paper_of(base_name)
    bullets = []
    for row in cells[2:]:
        name = re.sub(r"\s*\(c\d+\)$", "", row[0])
        if len(row) < 6 or row[1] == "-":
            bullets.append(f'- **{name}**: not defined ("-", as in the paper): the library refuses it.')
            continue
        diff, count = row[cells[0].index(delta_title)], row[cells[0].index(delta_title) + 1]
        ours = re.fullmatch(r"(\d+)/(\d+)", count)
        mine = paper_of(name)
        if not ours:
            bullets.append(f"- **{name}**: no finished run on the baseline's seeds yet ({row[1]}).")
            continue
        hits, n = int(ours[1]), int(ours[2])
        if mine is None or base is None:
            bullets.append(f"- **{name}**: Δ {metric} {diff}, {better} on {hits}/{n} seeds; the paper gives no figure.")
            continue
        paper_diff = mine - base
        if paper_diff == 0:
            verdict = "the paper shows **no difference** to compare signs with"
        else:
            paper_says = "better" if paper_diff * sign > 0 else "worse"
            agree = hits if paper_says == "better" else n - hits
            holds = agree == n
            verdict = (
                f"the paper has it **{paper_says}** than the base ({paper_diff:+.4g}); ours is {paper_says} on "
                f"{agree}/{n} seeds: **{'holds' if holds else 'does not hold'}**"
            )
            if n < 3:
                verdict += f" (n = {n})"
        bullets.append(f"- **{name}**: Δ {metric} {diff} (paired, ours) — {verdict}.")
    return bullets


def paper_claims_json(table: dict[str, Any]) -> list[str]:
    """The same rule from a ``table.json`` (written by the study's table code since it existed), for every metric
    the paper gives a figure for — Table VI's differences, for instance, are in its MAE, not its accuracy."""
    from training.metrics import METRICS
    from training.report import shown

    cells = {cell["key"]: cell for cell in table["cells"]}
    seeds = len(table["seeds"])
    bullets = []
    for cell in table["cells"]:
        name = " · ".join(cell["labels"].values()) or cell["key"]
        if cell["refused"]:
            bullets.append(f'- **{name}**: not defined ("-", as in the paper): {cell["refused"]}')
            continue
        base = cells.get(cell.get("baseline") or "")
        if base is None or cell["runs_as"] != cell["key"] or base["runs_as"] == cell["runs_as"]:
            continue
        parts = []
        for metric in table["metrics"]:
            title, higher = METRICS[metric].title, METRICS[metric].higher_is_better
            diff = cell.get(f"diff_{metric}")
            mine, theirs = (cell.get("paper") or {}).get(metric), (base.get("paper") or {}).get(metric)
            if not diff:
                parts.append(f"{title}: no paired run yet")
                continue
            ours = f"Δ {title} {shown(diff, seeds, metric, signed=True)}"
            if mine is None or theirs is None:
                parts.append(f"{ours}; the paper gives no figure")
                continue
            paper_diff = mine - theirs
            if paper_diff == 0:
                parts.append(f"{ours}; the paper shows no difference")
                continue
            paper_better = (paper_diff > 0) == higher
            agree = diff["better"] if paper_better else diff["n"] - diff["better"]
            verdict = "holds" if agree == diff["n"] else "does not hold"
            parts.append(
                f"{ours}; the paper has it {'better' if paper_better else 'worse'} ({paper_diff:+.4g}), ours is "
                f"{'better' if paper_better else 'worse'} on {agree}/{diff['n']} seeds: **{verdict}**"
                + (f" (n = {diff['n']})" if diff["n"] < 3 else "")
            )
        bullets.append(f"- **{name}** — " + "; ".join(parts) + ".")
    return bullets


class PaperClaims(SphinxDirective):
    """``.. paper-claims:: results/table4-fmnist/table.md`` (relative to the repository root)."""

    required_arguments = 1

    def run(self):
        path = ROOT / self.arguments[0]
        found = path.with_name("table.json")
        self.env.note_dependency(str(path))
        # table.json: every metric the paper gives; without it, the table's first metric, read from table.md
        bullets = paper_claims_json(json.loads(found.read_text())) if found.exists() else paper_claims(path)
        return self.parse_text_to_nodes("\n".join(bullets), allow_section_headings=False)


def provenance(directory: Path, name: str) -> list[str]:
    """What the results file says of where it came from (``run.md``, written by ``san study run --out``), or, for a
    file written before the commands stamped it, the commit that last changed it (``git log``)."""
    stamp = directory / "run.md"
    if stamp.exists():
        return stamp.read_text().splitlines()
    try:
        found = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "log",
                "-1",
                "--follow",
                "--diff-filter=AM",
                "--format=%h %cs",
                "--",
                str(directory / name),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        found = []
    when = f"this version was committed in `{found[0]}` on {found[1]}" if len(found) >= 2 else "no git history here"
    return [
        f"Written before the commands stamped their files with the command, date, machine and commit; {when} "
        f"(`git log --follow {(directory / name).relative_to(ROOT)}`). The command and the machine are the "
        "ones this page names."
    ]


class Provenance(SphinxDirective):
    """``.. results-provenance:: results/table4-fmnist table.md``."""

    required_arguments = 2

    def run(self):
        directory = ROOT / self.arguments[0]
        self.env.note_dependency(str(directory / self.arguments[1]))
        return self.parse_text_to_nodes(
            "\n".join(provenance(directory, self.arguments[1])), allow_section_headings=False
        )


def setup(app):
    app.add_directive("san-model", ModelFields)
    app.add_directive("san-openapi", OpenAPI)
    app.add_directive("paper-claims", PaperClaims)
    app.add_directive("results-provenance", Provenance)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
