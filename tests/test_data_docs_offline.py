"""GX Data Docs readable offline (issue 14): after a real ``fer data add`` (GX's checkpoint builds the
site) no page loads anything from the network, every file a page loads is in the site, and the index
page, opened offline in a real browser (Debian's ``chromium``, headless, with every host name made
unresolvable), renders its validation-results table. GX's own ``build_data_docs`` output, opened the
same way, renders nothing: the control that shows the browser check can fail.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from data_checks.docs import VENDOR, vendor_data_docs, vendor_site
from fer_core.data.formats import get_format

pytestmark = pytest.mark.slow  # the module fixture runs `fer data add` twice in subprocesses (~20 s)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
NODE = shutil.which("node")
ADDS = 2  # two versions of one dataset: two validation runs on the index


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_", "MLFLOW_"))}
    return {**env, "FER_HOME": str(home), "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(home / "dvc-site")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """``fer data add`` twice (the real CLI in a subprocess, a private FER_HOME); the GX project."""
    root = tmp_path_factory.mktemp("docs")
    home = root / "fer-home"
    runs = []
    for seed in range(ADDS):
        source = get_format("fer2013").write_synthetic(root / f"s{seed}", size=140, seed=seed)
        done = subprocess.run([sys.executable, "-m", "fer_cli", "data", "add", "fer", str(source), "--format", "fer2013"],
                              env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(re.search(r"^gate run: (\S+)$", done.stdout, re.M).group(1))
    project = home / "gx"
    site = project / "uncommitted" / "data_docs" / "local_site"
    assert (site / "index.html").is_file()
    return {"project": project, "site": site, "runs": runs}


class _Loads(HTMLParser):
    """What a browser would fetch for a page: scripts, stylesheets, icons, images, CSS ``url()``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag in ("script", "img", "iframe", "source") and attributes.get("src"):
            self.urls.append(attributes["src"])
        if tag == "link" and re.search(r"stylesheet|icon|preload|modulepreload", attributes.get("rel", "")):
            self.urls.append(attributes.get("href", ""))
        self.urls += _css_urls(attributes.get("style", ""))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False if tag == "style" else self._in_style

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += _css_urls(data)


def _css_urls(css: str) -> list[str]:
    found = re.findall(r"url\(\s*['\"]?([^'\")]+?)['\"]?\s*\)", css)
    found += re.findall(r"@import\s+['\"]([^'\"]+)['\"]", css)
    return [u for u in found if not u.startswith("data:")]


def _page_loads(page: Path) -> list[str]:
    parser = _Loads()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.urls


def _local(base: Path, url: str) -> Path:
    return (base / unquote(url.split("#", 1)[0].split("?", 1)[0])).resolve()


def test_no_page_loads_from_the_network_and_every_file_it_loads_is_in_the_site(built):
    site = built["site"]
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 1 + ADDS + 1  # the index, a page per validation run, the suite page(s)
    css_files: set[Path] = set()
    fonts: set[Path] = set()
    for page in pages:
        loads = _page_loads(page)
        assert loads, page  # GX's pages all load their scripts and stylesheets
        external = [u for u in loads if re.match(r"(?i)(https?:)?//", u)]
        assert external == [], (page.relative_to(site), external)
        for url in loads:
            target = _local(page.parent, url)
            assert target.is_file(), (page.relative_to(site), url)
            assert site.resolve() in target.parents, (page.relative_to(site), url)  # inside the site
            if target.suffix == ".css":
                css_files.add(target)
    for css in css_files:  # what the stylesheets load (Font Awesome's webfonts)
        for url in _css_urls(css.read_text(encoding="utf-8")):
            assert not re.match(r"(?i)(https?:)?//", url), (css, url)
            target = _local(css.parent, url)
            assert target.is_file(), (css, url)
            fonts |= {target} if target.suffix in (".woff2", ".ttf") else set()
    assert {f.name for f in fonts} >= {"fa-solid-900.woff2", "fa-regular-400.woff2", "fa-brands-400.woff2"}

    # the index page's tables hold every run, each linking a page that exists (what the browser renders)
    index = (site / "index.html").read_text(encoding="utf-8")
    assert index.count("bootstrapTable(") >= 2  # validation results and expectation suites
    for run in built["runs"]:
        assert f"'run_name': '{run}'" in index, run
    links = re.findall(r"'_table_row_link_path': '([^']+)'", index)
    assert sum(link.startswith("validations/") for link in links) == ADDS, links
    for link in links:
        assert _local(site, link).is_file(), link


def test_vendoring_again_changes_nothing(built):
    site = built["site"]
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert vendor_site(site) == []  # no external asset left that the manifest does not know
    after = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert after == before


def _templates_dir() -> Path:
    import great_expectations

    return Path(great_expectations.__file__).parent / "render" / "view" / "templates"


def test_the_vendored_files_are_the_packages_gx_names_with_their_hashes():
    """Every asset URL in the installed GX's templates is in the manifest; the vendored bytes match the
    manifest's sha256 and the SRI hashes GX pins; each licence is recorded; the JS parses (node)."""
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    import great_expectations

    assert manifest["great_expectations"] == great_expectations.__version__
    by_url: dict[str, Path] = {}
    for package in manifest["packages"]:
        folder = VENDOR / f"{package['name']}@{package['version']}"
        assert package["license"] and package["tarball"].startswith(manifest["registry"] + "/"), package["name"]
        assert package["integrity"].startswith("sha512-"), package["name"]
        if package["license_file"]:
            assert (folder / package["license_file"]).is_file()
        for name, record in package["files"].items():
            data = (folder / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["bytes"], name
            by_url |= {url: folder / name for url in record.get("cdn", [])}
        # only the listed files (and the licence) are vendored
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert present == {*package["files"], *([package["license_file"]] if package["license_file"] else [])}

    tags = []
    for template in _templates_dir().glob("*.j2"):
        tags += re.findall(r"<(?:script|link)\b[^>]*>", template.read_text())
    assert tags
    for tag in tags:
        url = re.search(r"(?:src|href)=\"(https?://[^\"]+)\"", tag)
        if url is None:
            continue
        assert url.group(1) in by_url, url.group(1)
        pinned = re.search(r"integrity=\"(sha\d+)-([^\"]+)\"", tag)
        if pinned:
            digest = hashlib.new(pinned.group(1), by_url[url.group(1)].read_bytes()).digest()
            assert base64.b64encode(digest).decode() == pinned.group(2), url.group(1)

    if NODE is None:
        pytest.skip("node not installed: JS parse check not run")
    for script in sorted(VENDOR.rglob("*.js")):
        checked = subprocess.run([NODE, "--check", str(script)], capture_output=True, text=True, timeout=120)
        assert checked.returncode == 0, (script, checked.stderr[-2000:])


# A probe appended to a copy of a page: what loaded, as the page's own scripts see it.
PROBE = """<script>
window.addEventListener('load', async () => {
  const $$ = window.jQuery;
  const r = {jquery: $$ ? $$.fn.jquery : null, bootstrapTable: !!($$ && $$.fn.bootstrapTable),
             bootstrap: !!($$ && $$.fn.tooltip), datepicker: !!($$ && $$.fn.datepicker),
             popper: typeof window.Popper === 'function', vegaEmbed: typeof window.vegaEmbed === 'function'};
  const hidden = document.createElement('div'); hidden.className = 'd-none'; document.body.appendChild(hidden);
  r.bootstrapCss = getComputedStyle(hidden).display === 'none';
  await document.fonts.ready;
  r.loadedFonts = [...document.fonts].filter(f => f.status === 'loaded').map(f => f.family + ' ' + f.weight);
  document.body.setAttribute('data-probe', JSON.stringify(r));
});
</script>"""


def _open_offline(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM of ``page`` after its scripts ran in headless Chromium, offline; and its console errors."""
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-extensions",
               # offline: no host name resolves and any proxy use goes to a closed port
               "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000",
               "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def _rows(dom: str, table: str) -> list[str]:
    """Rendered rows (bootstrap-table gives each a ``data-index``) of the table ``table`` on the page."""
    start = dom.find(f'id="{table}"')
    end = dom.find("</table>", start)
    return re.findall(r"<tr\b[^>]*data-index=[^>]*>.*?</tr>", dom[start:end], re.S) if start >= 0 else []


def _table_ids(index: str) -> list[str]:
    return re.findall(r"\$\('#([\w-]+-body-table)'\)\.bootstrapTable\(", index)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian: apt-get install chromium)")
def test_the_index_renders_its_results_offline_in_a_browser(built, tmp_path):
    site = built["site"]
    results, suites = _table_ids((site / "index.html").read_text(encoding="utf-8"))

    # the index the platform built, as a user opens it
    dom, console = _open_offline(site / "index.html", tmp_path / "profile")
    assert console == []
    rows = _rows(dom, results)
    assert len(rows) == ADDS, dom[:3000]
    for run in built["runs"]:
        assert sum(run in row for row in rows) == 1, run
    for href in re.findall(r'data-href="([^"]+)"', "".join(rows)):
        assert _local(site, html.unescape(href)).is_file(), href
    assert _rows(dom, suites)

    # what loaded, seen from inside the page (a copy beside the index, so its relative paths hold)
    probe = site / "index.probe.html"
    try:
        probe.write_text((site / "index.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
        dom, console = _open_offline(probe, tmp_path / "profile")
    finally:
        probe.unlink(missing_ok=True)
    assert console == []
    seen = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert seen["jquery"] == "3.7.1" and seen["bootstrapTable"] and seen["bootstrap"] and seen["datepicker"]
    assert seen["popper"] and seen["vegaEmbed"] and seen["bootstrapCss"]
    assert "Font Awesome 6 Free 900" in seen["loadedFonts"]  # the status icons' webfont, from the site

    # control: GX's own build_data_docs on a copy of the project gives pages that render nothing offline;
    # vendor_data_docs on that context makes them render
    import great_expectations as gx

    project = tmp_path / "gx"
    shutil.copytree(built["project"], project)
    context = gx.get_context(mode="file", context_root_dir=str(project))
    context.build_data_docs()
    copy = project / "uncommitted" / "data_docs" / "local_site" / "index.html"
    assert "https://code.jquery.com/" in copy.read_text(encoding="utf-8")
    dom, console = _open_offline(copy, tmp_path / "profile")
    assert _rows(dom, results) == [] and any("is not defined" in line for line in console)
    assert vendor_data_docs(context).resolve() == copy.resolve()
    dom, console = _open_offline(copy, tmp_path / "profile")
    assert console == [] and len(_rows(dom, results)) == ADDS
