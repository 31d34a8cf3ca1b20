"""The documentation builds as `make docs` builds it — warnings are errors, so a broken link, a missing results file
or a docstring that no longer parses fails here — and its references are the code's: every JobSpec and StudySpec
field, every route of the API and every `san` subcommand appears in the built pages."""

import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest
from pydantic import BaseModel

from training.config import JobSpec
from training.study import StudySpec

ROOT = Path(__file__).resolve().parent.parent


def fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    found = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        found.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += fields(annotation, f"{path}.")
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def text(page: Path) -> str:
    return unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_the_docs_build_without_a_warning_and_list_every_jobspec_and_studyspec_field(built):
    jobspec, studyspec = text(built / "reference" / "jobspec.html"), text(built / "reference" / "studyspec.html")
    assert [f for f in fields(JobSpec) if f not in jobspec] == []
    assert [f for f in fields(StudySpec) if f not in studyspec] == []


def test_the_rest_reference_is_the_apps_openapi_document_and_the_cli_reference_its_parsers(built):
    from san.cli import build_parser
    from service.app import create_app

    rest = text(built / "reference" / "rest.html")
    for path, operations in create_app().openapi()["paths"].items():
        for method in operations:
            assert f"{method.upper()} {path}" in rest
    cli = text(built / "reference" / "cli.html")
    commands = next(a for a in build_parser()._actions if a.choices and "models" in a.choices).choices
    assert [name for name in commands if f"san {name}" not in cli] == []


def test_the_results_pages_include_the_files_the_commands_wrote(built):
    paper = text(built / "results" / "paper.html")
    table = (ROOT / "results" / "table4-fmnist" / "table.md").read_text()
    first_row = next(line for line in table.splitlines() if line.startswith("| Base Model"))
    assert all(cell.strip() in paper for cell in first_row.strip("|").split("|"))
    assert "holds" in paper
    assert (built / "_images").is_dir()


def test_the_readmes_headline_table_is_the_file_the_study_wrote():
    sys.path.insert(0, str(ROOT / "docs"))
    from readme_table import START, headline, with_table

    readme = (ROOT / "README.md").read_text()
    assert START in readme and with_table(readme, headline()) == readme
    assert len(readme.splitlines()) <= 200


def test_the_paper_claims_apply_the_rule_to_the_table_the_study_wrote(tmp_path):
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    from san_docs import paper_claims

    table = "\n".join(
        [
            "### t: top-1 / top-5 (%)",
            "| Module | a = b Top-1 | a = b paper Top-1 |",
            "|---|---|---|",
            "| Base Model | 88.00 ± 0.10 | 89.00 |",
            "| X | 87.00 ± 0.10 | 88.50 |",
            "| Y | 88.50 ± 0.10 | 89.50 |",
            "",
            "| cell | runs | top-1 % | Δ top-1 vs baseline (paired) | Δ > 0 | s/epoch | × baseline | params |",
            "|---|---|---|---|---|---|---|---|",
            "| Base Model · a (c000) | 3 succeeded | 88.00 ± 0.10 |  |  | 1.0 |  | 10 |",
            "| X · a (c002) | 3 succeeded | 87.00 ± 0.10 | -1.00 ± 0.10 | 0/3 | 1.0 | 1.00 | 10 |",
            "| Y · a (c004) | 3 succeeded | 88.50 ± 0.10 | +0.50 ± 0.60 | 2/3 | 1.0 | 1.00 | 10 |",
        ]
    )
    path = tmp_path / "table.md"
    path.write_text(table)
    x, y = paper_claims(path)
    assert "**X · a**" in x and "worse" in x and "3/3 seeds: **holds**" in x
    assert "**Y · a**" in y and "better" in y and "2/3 seeds: **does not hold**" in y
