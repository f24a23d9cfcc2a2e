"""The notebooks as a book: which public definitions each notebook shows by an example with stored output, and how long
its exported cells are. `tests/unit/test_book.py` holds the book to this; run `python tests/book.py [NOTEBOOK ...]` to see
what a notebook still lacks."""
from __future__ import annotations
import ast, json, re, statistics, sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
from build import book_notebooks  # noqa: E402  (docs/build.py: the chapters in reading order, as the site lists them)
DIRECTIVE = re.compile(r"^\s*#\s*\|\s*(\w+)", re.M)




def directives(source: str) -> set[str]:
    return {m.group(1) for m in DIRECTIVE.finditer(source)}


def shows_output(cell: dict) -> bool:
    "The cell has a stored result, display or printed text (an error does not count)."
    return any(o.get("output_type") in ("execute_result", "display_data", "stream") for o in cell.get("outputs", []))


@dataclass
class Chapter:
    path: Path
    defined: list[str] = field(default_factory=list)          # public functions and classes, in order of definition
    exported_cells: list[int] = field(default_factory=list)   # line counts of the exported code cells
    example_text: list[str] = field(default_factory=list)     # sources of the example cells with stored output
    assertion_idioms: int = 0                                   # `try: ...; raise AssertionError` where test_fail would do

    @classmethod
    def read(cls, path: Path) -> "Chapter":
        ch = cls(path)
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code": continue
            src = "".join(cell["source"])
            if "export" in directives(src) or "exports" in directives(src):
                ch.exported_cells.append(len(src.strip().splitlines()))
                tree = ast.parse(src)
                ch.defined += [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                               and not n.name.startswith("_")]
            else:
                if re.search(r"raise AssertionError", src): ch.assertion_idioms += 1
                if shows_output(cell): ch.example_text.append(src)
        return ch

    def missing(self) -> list[str]:
        "Public definitions no example cell with stored output names."
        text = "\n".join(self.example_text)
        return [n for n in self.defined if not re.search(rf"\b{re.escape(n)}\b", text)]


def chapters(paths=None) -> list[Chapter]:
    return [Chapter.read(Path(p).resolve()) for p in (paths or book_notebooks())]


def report(paths=None) -> str:
    chs = chapters(paths)
    lines, total, shown, cells = [], 0, 0, []
    for ch in chs:
        miss = ch.missing()
        total += len(ch.defined); shown += len(ch.defined) - len(miss); cells += ch.exported_cells
        if miss or ch.assertion_idioms:
            lines.append(f"{ch.path.relative_to(ROOT)}: {len(ch.defined) - len(miss)}/{len(ch.defined)} shown"
                         + (f"; missing: {', '.join(miss)}" if miss else "")
                         + (f"; {ch.assertion_idioms} try/raise AssertionError" if ch.assertion_idioms else ""))
    if cells:
        lines.append(f"exported cells: {len(cells)}, median {statistics.median(cells):g} lines, "
                     f"{sum(c > 40 for c in cells)} over 40, longest {max(cells)}")
    lines.append(f"public definitions shown by an example with stored output: {shown} of {total}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1:] or None))
