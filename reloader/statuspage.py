"""The status page (`GET /`): one HTML file shipped in the package, with its script and style inline.

Nothing is loaded from the internet and nothing is built: the page reads `GET /models` itself. Its
Content-Security-Policy allows exactly the inline script and style it ships, by their sha256, so no
'unsafe-inline' is needed and any other script (an injected one included) is refused by the browser.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

# The exact text between the tags is what the browser hashes: no attributes, so the match is unambiguous.
_INLINE = {"script": re.compile(r"<script>(.*?)</script>", re.S), "style": re.compile(r"<style>(.*?)</style>", re.S)}


def csp_hash(text: str) -> str:
    """A CSP source expression for one inline element's text, as browsers compute it (UTF-8, sha256)."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(page: str) -> str:
    """The policy for `page`: only itself ('self'), plus its own inline script and style by hash."""
    sources = {}
    for tag, pattern in _INLINE.items():
        found = pattern.findall(page)
        if not found:
            raise ValueError(f"the status page has no inline <{tag}>")
        sources[tag] = " ".join(csp_hash(text) for text in found)
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src {sources['script']}",
            f"style-src {sources['style']}",
            "connect-src 'self'",
            "img-src 'self' data: blob:",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


# Read and hashed once, at import: the file ships in the wheel next to this module.
PAGE = files("reloader").joinpath("static/status.html").read_text(encoding="utf-8")
HEADERS = {
    "Content-Security-Policy": content_security_policy(PAGE),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def status_page(request: Request) -> Response:
    """GET / (and HEAD): the page, as text/html; charset=utf-8, revalidated on every load."""
    return HTMLResponse(PAGE, headers=HEADERS)
