"""The documentation site: `docs/build.py` (what `make docs` runs) builds it from the notebooks and the guides; every page of
the sidebar exists, every link inside the site resolves (to a file, and to an element with that id), each module docstring's
`Docs:` line names a page that was built, and headless Chromium renders the index and an API page (screenshots under the
test's tmp dir)."""
from __future__ import annotations
import importlib, pkgutil, re, shutil, subprocess, sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))
import build  # noqa: E402  (docs/build.py)

pytestmark = pytest.mark.slow


class Page(HTMLParser):
    "The ids an HTML page defines and the links (href/src) it makes."
    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"): self.ids.add(a["id"])
        if tag == "a" and a.get("name"): self.ids.add(a["name"])
        for key in ("href", "src"):
            if a.get(key) and not (tag == "link" and a.get("rel") == "preconnect"): self.links.append(a[key])


def parse(path: Path) -> Page:
    p = Page(); p.feed(path.read_text(errors="replace")); return p


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(ROOT / "docs/build.py"), "--site-only", "--out", str(out)], cwd=ROOT, check=True,
                   timeout=1200)
    return out / "html"


def test_every_chapter_and_guide_is_a_page(site):
    pages = [build.page_of(nb).with_suffix(".html") for nb in build.book_notebooks()]
    pages += [Path("guides") / f"{g}.html" for g in build.GUIDES]
    missing = [p.as_posix() for p in pages if not (site / p).is_file()]
    assert not missing, f"pages not built: {missing}"
    nav = parse(site / "index.html").links
    assert all(any(l.endswith(p.name) for l in nav) for p in pages), "a page is missing from the sidebar"
    assert len(pages) >= 45


def test_every_internal_link_resolves(site):
    cache: dict[Path, Page] = {}
    broken = []
    pages = [p for p in sorted(site.rglob("*.html")) if "_static" not in p.relative_to(site).parts]   # the theme's template macros are no pages
    assert len(pages) >= 45
    for html in pages:
        page = cache.setdefault(html, parse(html))
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:", "data:")): continue
            target = html if not parts.path else (html.parent / unquote(parts.path)).resolve()
            if target.is_dir(): target = target / "index.html"
            if not target.exists():
                broken.append(f"{html.relative_to(site)}: {link} (no file)"); continue
            if parts.fragment and target.suffix == ".html":
                ids = cache.setdefault(target, parse(target)).ids
                if unquote(parts.fragment) not in ids: broken.append(f"{html.relative_to(site)}: {link} (no such anchor)")
    assert not broken, f"{len(broken)} broken links, e.g. {broken[:10]}"


def test_module_docstrings_name_pages_that_exist(site):
    import mlnb
    base = build.doc_base()
    named = {}
    for m in pkgutil.walk_packages(mlnb.__path__, "mlnb."):
        doc = importlib.import_module(m.name).__doc__ or ""
        if found := re.search(r"^Docs: (\S+)$", doc, re.M): named[m.name] = found.group(1)
    assert len(named) >= 35, named
    assert all(url.startswith(base) for url in named.values()), {k: v for k, v in named.items() if not v.startswith(base)}
    missing = {k: v for k, v in named.items() if not (site / v[len(base):]).is_file()}
    assert not missing, f"docstrings naming pages that were not built: {missing}"
    # the markdown copy is the page: its title and a definition of the module
    md = (site / named["mlnb.serving.app"][len(base):]).read_text()
    assert md.startswith("# ") and "create_app" in md


def test_api_page_shows_definitions_and_examples(site):
    html = (site / "08_serving/app.html").read_text()
    assert 'id="create_app"' in html or 'id="create-app"' in html
    assert "build_server" in html and "cell_output" in html          # an example with its stored output


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is installed by `make tools`")
def test_browser_renders_index_and_an_api_page(site, tmp_path):
    from PIL import Image
    shots = {}
    for name, page in (("index", "index.html"), ("api", "05_model/signing.html")):
        png = tmp_path / f"{name}.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000", f"--screenshot={png}",
                        (site / page).as_uri()], check=True, timeout=120, capture_output=True)
        shots[name] = Image.open(png).convert("L")
    for name, img in shots.items():
        assert img.size == (1400, 1000), name
        lo, hi = img.getextrema()
        assert hi - lo > 100, f"{name}: the screenshot is blank"
        # a rendered page: text and a sidebar make many distinct grey levels, an error page few
        assert len(set(img.getdata())) > 30, f"{name}: too few shades for a rendered page"
    assert list(shots["index"].getdata()) != list(shots["api"].getdata())
