"""Build the documentation site from the notebooks: `make docs` (or `python docs/build.py`), into `_docs/html/`.

The book's notebooks (nbs/index.ipynb, then the lifecycle folders nbs/NN_stage/) go through nbdev's own processors, the ones
`nbdev-preview` uses before Quarto: a `show_doc` for every exported definition, exported code hidden, `#| hide` cells gone,
names linked to their pages. The processed notebooks, with the outputs stored in them (nothing is executed again), and the
guides in docs/guides/ are then rendered by Sphinx with myst-nb and the Sphinx Book Theme. Quarto, nbdev's own renderer,
cannot be installed from the package registries; Sphinx can, and it renders notebooks with their outputs.

Each page sits where nbdev's `nbpath2html` puts it (nbs/08_serving/02_runtime.ipynb -> 08_serving/runtime.html), which is
what the `Docs:` line of each module docstring names (`[project.urls] Documentation` in pyproject.toml is the base), and
beside each page a markdown copy, `<page>.html.md`, as nbdev sites have.
"""
from __future__ import annotations
import argparse, json, os, re, shutil, subprocess, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NBS = ROOT / "nbs"
CAPTIONS = {"01_core": "Core", "02_data": "Data", "03_features": "Features", "04_training": "Training", "05_model": "The model file",
            "06_evaluation": "Evaluation", "07_registry": "Registry", "08_serving": "Serving", "09_rollout": "Rollout",
            "10_monitoring": "Monitoring", "11_pipeline": "Pipelines", "12_cli": "Command line", "13_appendix": "Appendix"}
GUIDES = ["own-data", "pipeline", "registry", "serving", "rollout", "monitoring", "continuous-training", "team-mode",
          "security-and-reliability", "benchmarks"]
DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def doc_base() -> str:
    "The site's published address: `[project.urls] Documentation` in pyproject.toml, ending in a slash."
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    return urls["Documentation"].rstrip("/") + "/"


def book_notebooks() -> list[Path]:
    "The chapters in reading order: the index, then each lifecycle folder's notebooks (nbs/stages holds the pipeline's stages)."
    return [NBS / "index.ipynb"] + sorted(NBS.glob("[0-9][0-9]_*/*.ipynb"))


def page_of(notebook: Path) -> Path:
    "The page a notebook becomes, relative to the site root, without suffix: nbdev's `nbpath2html`."
    from nbdev.config import nbpath2html
    return nbpath2html(notebook.relative_to(NBS)).with_suffix("")


def heading_anchors(markdown: str) -> set[str]:
    "The anchors MyST gives the headings of a markdown text (GitHub-style slugs), code blocks left out."
    from myst_parser.slugs import github_slugify
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return {github_slugify(re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).strip())
            for m in re.finditer(r"^#{1,4}\s+(.+?)\s*$", text, re.M)}


class Site:
    "The pages being staged: each page's source suffix and its heading anchors, so links into the site can be checked as written."
    def __init__(self, base: str):
        self.base, self.suffix, self.anchors, self.origin, self.pages = base, {}, {}, {}, {}

    def add(self, page: Path, suffix: str, markdown: str, origin: Path) -> None:
        "A page, its source suffix in the staged tree, its text (for the anchors) and the file in the repository it comes from."
        self.suffix[page.as_posix()] = suffix
        self.anchors[page.as_posix()] = heading_anchors(markdown)
        self.origin[page.as_posix()] = origin.resolve()
        self.pages[origin.resolve()] = page.as_posix()

    def source_link(self, target: str, page: Path) -> str:
        """A relative link written between files of the repository (a guide to a notebook, the index to a guide, as they
        read on GitHub) as the link between the pages they become; any other link as it was."""
        path, _, anchor = target.partition("#")
        if not path or re.match(r"^[a-z]+:", path): return target
        file = (self.origin[page.as_posix()].parent / path).resolve()
        if file not in self.pages: return target
        dest = self.pages[file]
        rel = os.path.relpath(dest + self.suffix[dest], start=page.parent.as_posix() or ".")
        return rel + (f"#{anchor}" if anchor else "")

    def link(self, url: str, page: Path) -> str:
        """A link to the published site (nbdev writes them, `doc_host` + page + `#name`) as a link between source files,
        relative to `page`, which MyST checks; its anchor as MyST slugs it, or none where the target has no such heading."""
        from myst_parser.slugs import github_slugify
        target, _, anchor = url[len(self.base):].partition("#")
        target = re.sub(r"\.html(\.md)?$", "", target or "index.html")
        if target not in self.suffix: return url                  # not a page of this site: left as it was
        rel = os.path.relpath(target + self.suffix[target], start=page.parent.as_posix() or ".")
        slug = github_slugify(anchor.replace(".", "")) if anchor else ""
        return rel + (f"#{slug}" if slug and slug in self.anchors[target] else "")

    def localize(self, text: str, page: Path) -> str:
        "Links into the site made relative; Quarto's link attributes (`{target=...}`) dropped, since Sphinx does not read them."
        text = re.sub(r"\)\{target=\"_blank\"[^}]*\}", ")", text)
        text = re.sub(r"(\]\()([^)\s]+)(\))", lambda m: m.group(1) + self.source_link(m.group(2), page) + m.group(3), text)
        return re.sub(re.escape(self.base) + r"[^)\s\"'>]*", lambda m: self.link(m.group(0), page), text)


def myst_cell(cell: dict) -> dict | None:
    """One processed cell in the form myst-nb reads: nbdev's front matter becomes the title, a `show_doc` output (Quarto's
    `output: asis`) a markdown cell of its own, so each definition is a section with an anchor, and the other `#|` options
    cell tags. None drops the cell."""
    if cell["cell_type"] == "raw":                                     # nbdev's front matter: the title and description
        import yaml
        meta = yaml.safe_load("".join(cell["source"]).strip().strip("-")) or {}
        if "title" not in meta: return None
        return {"cell_type": "markdown", "metadata": {}, "source": f"# {meta['title']}\n\n{meta.get('description', '')}\n"}
    source = "".join(cell["source"])
    if cell["cell_type"] == "markdown":
        cell["source"] = source
        return cell
    lines, tags = source.splitlines(), set(cell.get("metadata", {}).get("tags", []))
    options = {}
    while lines and (m := DIRECTIVE.match(lines[0])):
        options[m.group(1)] = m.group(2).lower(); lines.pop(0)
    if options.get("include") == "false": return None
    if options.get("output") == "asis":
        md = "".join(cell["outputs"][0]["data"]["text/markdown"]) if cell.get("outputs") else ""
        return {"cell_type": "markdown", "metadata": {}, "source": doc_section(md)} if md else None
    if options.get("echo") == "false": tags.add("remove-input")
    if options.get("output") == "false": tags.add("remove-output")
    cell["source"] = "\n".join(lines)
    cell["metadata"] = {"tags": sorted(tags)} if tags else {}
    return cell


def doc_section(md: str) -> str:
    "A show_doc block as a section: its heading first (nbdev puts the source link above it), then the signature and docstring."
    md = re.sub(r"^---\s*\n", "", md.lstrip())
    link = re.match(r"\[source\]\(([^)]*)\)(\{[^}]*\})?\s*\n", md)
    if not link: return md
    md = md[link.end():].lstrip()
    head, _, rest = md.partition("\n")
    return f"{head}\n\n<a class=\"mlnb-source\" href=\"{link.group(1)}\">source</a>\n{rest}"


def localize_cell(cell: dict, site: Site, page: Path) -> dict:
    if cell["cell_type"] == "markdown": cell["source"] = site.localize(cell["source"], page)
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "text/markdown" in data:
            md = "".join(data["text/markdown"]) if isinstance(data["text/markdown"], list) else data["text/markdown"]
            data["text/markdown"] = site.localize(md, page)
    return cell


def render_show_docs(nb, module) -> None:
    "Fill in the output of each `show_doc(...)` cell without one, evaluated in the namespace of the notebook's module."
    from nbdev.showdoc import show_doc
    for cell in nb.cells:
        if cell.cell_type != "code" or cell.get("outputs"): continue
        m = re.fullmatch(r"(?:#\|.*\n)*show_doc\((.+)\)\s*", cell.source)
        if not m or module is None: continue
        obj = eval(m.group(1), vars(module))
        inherited = isinstance(obj, type) and not obj.__dict__.get("__doc__")
        if inherited: obj.__doc__ = ""                                 # not pydantic's BaseModel text: the class has none
        try: md = show_doc(obj)._repr_markdown_()
        except NameError: md = plain_doc(obj)                         # an annotation names a type imported only for checkers
        finally:
            if inherited: obj.__doc__ = None
        cell["outputs"] = [{"output_type": "execute_result", "execution_count": None, "metadata": {},
                            "data": {"text/markdown": md, "text/plain": ""}}]


def plain_doc(obj) -> str:
    "show_doc's layout from the signature as written (annotations unevaluated) and the docstring."
    import inspect
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    try: sig = str(inspect.signature(obj, eval_str=False))
    except (TypeError, ValueError): sig = ""
    kind = "class" if inspect.isclass(obj) else "def"
    doc = inspect.getdoc(obj) or ""
    return f"---\n\n### {name}\n\n```python\n{kind} {name.split('.')[-1]}{sig}\n```\n\n" + (f"*{doc}*" if doc else "")


def process(notebook: Path) -> list[dict]:
    """The cells of `notebook`'s page: nbdev's doc processors, then `myst_cell`. nbdev's `exec_show_docs`, which
    runs the notebook's import cells in a kernel to render the `show_doc` cells, is left out: they are rendered here from
    the exported module, and no example code runs."""
    import importlib
    from fastcore.nbio import nb2str, read_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults
    nb = read_nb(notebook)
    exp = re.search(r"^#\|\s*default_exp\s+(\S+)", "\n".join(c.source for c in nb.cells if c.cell_type == "code"), re.M)
    module = importlib.import_module(f"mlnb.{exp.group(1)}") if exp else None
    procs = [p for p in FilterDefaults().procs() if p.__name__ != "exec_show_docs"]
    NBProcessor(nb=nb, procs=procs, rm_directives="quarto").process()
    render_show_docs(nb, module)
    raw = json.loads(nb2str(nb))                                      # plain dicts
    cells = [c for c in map(myst_cell, raw["cells"]) if c is not None]
    for c in cells:
        c.pop("id", None)
        if c["cell_type"] == "code": c.setdefault("outputs", []); c.setdefault("execution_count", None)
    return cells


def write_notebook(path: Path, cells: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                            "language": "python"}},
                                "nbformat": 4, "nbformat_minor": 4}, indent=1))


def toctree(chapters: list[Path]) -> str:
    "The sidebar: the guides, then one captioned section per lifecycle folder."
    blocks = ["```{toctree}\n:caption: Guides\n:maxdepth: 1\n:hidden:\n\n" + "\n".join(f"guides/{g}" for g in GUIDES) + "\n```"]
    for folder, caption in CAPTIONS.items():
        pages = [page_of(c).as_posix() for c in chapters if c.parent.name == folder]
        if pages: blocks.append(f"```{{toctree}}\n:caption: {caption}\n:maxdepth: 1\n:hidden:\n\n" + "\n".join(pages) + "\n```")
    return "\n\n".join(blocks) + "\n"


def stage(src: Path) -> None:
    "Everything Sphinx reads, under `src`: conf.py, the guides (with the benchmark figures) and the processed book."
    site = Site(doc_base())
    if src.exists(): shutil.rmtree(src)
    src.mkdir(parents=True)
    shutil.copy(DOCS / "conf.py", src / "conf.py")
    shutil.copytree(DOCS / "_static", src / "_static")
    shutil.copytree(ROOT / "benchmarks/results", src / "benchmarks/results")   # the figures the benchmark scripts write
    chapters, pages = book_notebooks(), {}
    for nb in chapters:
        page = page_of(nb)
        pages[page] = process(nb)
        site.add(page, ".ipynb", "\n\n".join(c["source"] for c in pages[page] if c["cell_type"] == "markdown"), nb)
        print(f"  {nb.relative_to(ROOT)} -> {page}", flush=True)
    guides = {Path("guides") / g: (DOCS / "guides" / f"{g}.md").read_text() for g in GUIDES}
    for page, text in guides.items(): site.add(page, ".md", text, DOCS / page.with_suffix(".md"))
    for page, cells in pages.items():
        write_notebook(src / page.with_suffix(".ipynb"), [localize_cell(c, site, page) for c in cells])
    for page, text in guides.items():
        (src / page).parent.mkdir(parents=True, exist_ok=True)
        (src / page.with_suffix(".md")).write_text(site.localize(text, page))
    index = json.loads((src / "index.ipynb").read_text())
    index["cells"].append({"cell_type": "markdown", "metadata": {}, "source": toctree(chapters[1:])})
    (src / "index.ipynb").write_text(json.dumps(index, indent=1))


def markdown_copies(src: Path, html: Path) -> None:
    "`<page>.html.md` beside each page: the page as markdown, which the module docstrings' `Docs:` lines point at."
    from nbconvert import MarkdownExporter
    exporter = MarkdownExporter(exclude_input=False)
    for nb in src.rglob("*.ipynb"):
        rel = nb.relative_to(src).with_suffix(".html.md")
        body, _ = exporter.from_filename(str(nb))
        (html / rel).write_text(body)
    for md in (src / "guides").glob("*.md"):
        shutil.copy(md, html / "guides" / f"{md.stem}.html.md")


def readme() -> str:
    """README.md: the index notebook's markdown, its links to notebooks and guides made relative to the repository's root
    (so they work on GitHub); the index is the README's source."""
    cells = json.loads((NBS / "index.ipynb").read_text())["cells"]
    text = "\n\n".join("".join(c["source"]).strip() for c in cells if c["cell_type"] == "markdown")
    def rebase(m):
        target = m.group(2)
        if re.match(r"^([a-z]+:|#)", target): return m.group(0)
        return m.group(1) + os.path.relpath((NBS / target).resolve(), ROOT) + m.group(3)
    text = re.sub(r"(\]\()([^)\s]+)(\))", rebase, text)
    text = text.replace("`nbs/stages/`", "[`nbs/stages/`](nbs/stages)")
    return ("<!-- Generated from nbs/index.ipynb by `make docs`; edit the notebook, not this file. -->\n\n" + text + "\n"
            + f"\nThe documentation site: `make docs`, then open `_docs/html/index.html` (published at {doc_base()}).\n")


def build(out: Path) -> Path:
    """Stage the sources in OUT/src and build the site into OUT/html.new, which replaces OUT/html only once the build has
    succeeded: a failed build leaves the previous site as it was."""
    src, html, new = out / "src", out / "html", out / "html.new"
    print(f"staging the book into {src}", flush=True)
    stage(src)
    if new.exists(): shutil.rmtree(new)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-W", "--keep-going", "-j", "2", str(src), str(new)]
    print(" ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, check=True)
        markdown_copies(src, new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if html.exists(): shutil.rmtree(html)
    new.rename(html)
    print(f"site: {html / 'index.html'}")
    return html


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "_docs", help="build folder (the site goes to OUT/html)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--readme", action="store_true", help="only write README.md from nbs/index.ipynb")
    which.add_argument("--site-only", action="store_true", help="only build the site (README.md left as it is)")
    args = ap.parse_args()
    if not args.site_only: (ROOT / "README.md").write_text(readme())
    if args.readme: sys.exit(0)
    try: build(args.out.resolve())
    except subprocess.CalledProcessError as e: sys.exit(f"docs: sphinx-build failed (exit status {e.returncode}); see the warnings above")
