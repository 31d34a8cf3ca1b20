"""Copy the headline table — the first table of ``results/table4-fmnist/table.md``, as ``san study run`` wrote it —
into README.md between its ``<!-- results/table4-fmnist/table.md -->`` and ``<!-- end -->`` markers.

    python docs/readme_table.py            # rewrite the block
    python docs/readme_table.py --check    # exit 1 when the README's block differs from the file
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "results/table4-fmnist/table.md"
START, END = f"<!-- {SOURCE} -->", "<!-- end -->"


def headline(root: Path = ROOT) -> str:
    """The first pipe table of the results file."""
    lines = (root / SOURCE).read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[first:end])


def with_table(readme: str, table: str) -> str:
    before, rest = readme.split(START + "\n", 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table}\n{END}{after}"


def main() -> int:
    path = ROOT / "README.md"
    readme = path.read_text()
    wanted = with_table(readme, headline())
    if "--check" in sys.argv:
        if wanted != readme:
            print(f"README.md's table differs from {SOURCE}: run python docs/readme_table.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
