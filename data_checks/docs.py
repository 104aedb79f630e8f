"""Data Docs readable offline: GX's pages load jQuery, Bootstrap, bootstrap-table, Vega and Font
Awesome from CDNs; without them the index page lists nothing. The exact packages and versions GX
references are vendored (from npm) under ``data_checks/vendor/`` and copied next to the site, and
every page's CDN links are rewritten to those local files after each docs build.

Choices (recorded here because GX leaves them open):
- ``vendor/manifest.json`` is the one list of CDN URL -> vendored file; a URL GX adds in another
  version stays as it is and is logged, and ``tests/test_data_docs_offline.py`` fails on it.
- ``vega@5``, ``vega-lite@5`` and ``vega-embed@6`` are ranges on the CDN; the newest release in
  each range at vendoring time is pinned (the manifest's ``version`` and ``cdn_range``).
- The ``integrity``/``crossorigin`` attributes of rewritten tags are dropped: Chromium blocks a
  ``crossorigin`` script from ``file://`` as a CORS error (seen here), so popper would not load. The vendored files are the ones those hashes name
  (checked by the test), and the manifest keeps every file's sha256.
- GX's navbar logo comes from S3 although GX copies it into ``static/images/``; it is pointed at
  that copy. The dark-mode logo (``full_logo_dark.png``) is not shipped by GX, so the light one
  stands in for it.
- GX's ``favicon.j2`` climbs one folder too few on validation pages (``../`` x dots+3, where the
  navbar uses dots+4), so their icon link points outside the site; local ``static/`` links in
  tags are re-pointed at the site's ``static/`` from each page's real depth.
- Rewriting after the build, not templates: GX's ``custom_views_directory`` is searched after
  its own templates, so it cannot replace ``js_script_imports.j2`` and friends.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from fer_core.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

VENDOR = Path(__file__).resolve().parent / "vendor"
SITE_VENDOR = Path("static") / "vendor"  # inside the site, beside GX's own static/images, styles, fonts
SITE_STATIC = Path("static")

# A URL in an attribute value or a CSS url(); quotes and parentheses end it.
_URL = re.compile(r"https?://[^\s\"'()<>]+")
_TAG = re.compile(r"<(?:script|link|img)\b[^>]*>", re.IGNORECASE)
_CSS_URL = re.compile(r"url\(\s*(['\"]?)(https?://[^'\")\s]+)\1\s*\)")
_LOCAL_STATIC = re.compile(r"\b(src|href)=([\"'])(?:\./|\.\./)*static/([^\"']*)\2", re.IGNORECASE)
_SRI_ATTRS = re.compile(r"\s+(?:integrity|crossorigin)=(?:\"[^\"]*\"|'[^']*'|[^\s>]+)", re.IGNORECASE)


@dataclass(frozen=True)
class VendoredAssets:
    """What the manifest says: CDN URL -> file under the site's ``static/``, and the files to copy."""

    targets: dict[str, str]
    files: tuple[str, ...]  # relative to ``VENDOR`` (== relative to the site's ``static/vendor``)


@lru_cache(maxsize=1)
def vendored_assets() -> VendoredAssets:
    """Read ``vendor/manifest.json`` once."""
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    targets: dict[str, str] = {}
    files: list[str] = []
    for package in manifest["packages"]:
        folder = f"{package['name']}@{package['version']}"
        listed = [*package["files"], *([package["license_file"]] if package.get("license_file") else [])]
        files += [f"{folder}/{name}" for name in listed]
        for name, record in package["files"].items():
            for url in record.get("cdn", []):
                targets[url] = (SITE_VENDOR / folder / name).relative_to(SITE_STATIC).as_posix()
    images = {k: v for k, v in manifest.get("site_images", {}).items() if k.startswith(("http://", "https://"))}
    targets.update(images)
    return VendoredAssets(targets=targets, files=tuple(files))


def site_index(context: Any) -> Path | None:
    """The local Data Docs site's ``index.html`` of a file GX context, if built."""
    sites = context.get_docs_sites_urls()
    if sites and sites[0].get("site_url"):
        return Path(url2pathname(urlparse(sites[0]["site_url"]).path))
    return None


def vendor_data_docs(context: Any) -> Path | None:
    """Make the built site self-contained; returns its index page.

    Copies the vendored assets to ``<site>/static/vendor/`` and rewrites every HTML page's CDN
    references to relative paths. Idempotent; downloads nothing.
    """
    index = site_index(context)
    if index is not None and index.is_file():
        vendor_site(index.parent)
    return index


def vendor_site(site: Path) -> list[str]:
    """Vendor the Data Docs site folder ``site`` (see :func:`vendor_data_docs`).

    Returns the external asset URLs still referenced (none unless GX added one the manifest lacks).
    """
    assets = vendored_assets()
    for relative in assets.files:
        source, target = VENDOR / relative, site / SITE_VENDOR / relative
        if not target.is_file() or target.stat().st_size != source.stat().st_size \
                or target.read_bytes() != source.read_bytes():
            atomic_write_bytes(target, source.read_bytes())
    unknown: set[str] = set()
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        if "://" not in text:
            continue
        static = Path(os.path.relpath(site / SITE_STATIC, page.parent)).as_posix()
        rewritten = rewrite_page(text, static, assets.targets, unknown)
        if rewritten != text:
            atomic_write_text(page, rewritten)
    for url in sorted(unknown):
        log.warning("Data Docs still load %s (not in data_checks/vendor/manifest.json)", url)
    return sorted(unknown)


def rewrite_page(text: str, static: str, targets: dict[str, str], unknown: set[str] | None = None) -> str:
    """``text`` with each known asset URL in script/link/img tags and CSS ``url()`` replaced by
    ``<static>/<target>``; unknown external asset URLs are added to ``unknown``."""
    unknown = set() if unknown is None else unknown

    def local(url: str) -> str | None:
        target = targets.get(url.split("?", 1)[0])  # GX appends ?d=<time>&dataContextId= to its logo
        return None if target is None else f"{static}/{target}"

    def tag(match: re.Match[str]) -> str:
        html = match.group(0)
        lowered = html.lower()
        if lowered.startswith("<link") and not re.search(r"rel=[\"']?(?:stylesheet|icon|shortcut icon)", lowered):
            return html  # <link rel="canonical"> etc. load nothing
        changed = False

        def swap(url_match: re.Match[str]) -> str:
            nonlocal changed
            replacement = local(url_match.group(0))
            if replacement is None:
                unknown.add(url_match.group(0))
                return url_match.group(0)
            changed = True
            return replacement

        html = _URL.sub(swap, html)
        html = _SRI_ATTRS.sub("", html) if changed else html
        return _LOCAL_STATIC.sub(lambda m: f"{m.group(1)}={m.group(2)}{static}/{m.group(3)}{m.group(2)}", html)

    def css(match: re.Match[str]) -> str:
        replacement = local(match.group(2))
        if replacement is None:
            unknown.add(match.group(2))
            return match.group(0)
        return f"url({match.group(1)}{replacement}{match.group(1)})"

    return _CSS_URL.sub(css, _TAG.sub(tag, text))

