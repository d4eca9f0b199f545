"""The HTML of `search.py serve`: a search box and, for a query, a grid of ranked thumbnails (no JavaScript).

Every piece of user or file-system text goes through html.escape (and urllib.parse.quote inside URLs). A file
name that is not UTF-8 is shown with its odd bytes as \\xNN and linked by its exact bytes (%XX), which the
server decodes back to the same name.
"""
from __future__ import annotations

import html
import os
from urllib.parse import quote

from retrieval.image_folder import shown_name

MAX_QUERY_CHARS = 1000
MAX_K = 100
DEFAULT_K = 10
IMAGE_ROUTE = "/image/"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; background: #fafafa; color: #222; }
header { background: #fff; border-bottom: 1px solid #ddd; padding: 16px 24px; }
form { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
input[name=q] { flex: 1 1 420px; font-size: 16px; padding: 8px; }
input[name=k] { width: 4em; font-size: 16px; padding: 8px; }
button { font-size: 16px; padding: 8px 16px; }
.about { color: #666; margin: 8px 0 0; font-size: 13px; }
main { padding: 16px 24px; }
.message { padding: 12px 16px; border-radius: 4px; background: #fff3cd; border: 1px solid #e0c36a; }
.error { background: #fde2e1; border-color: #e08b86; }
ol.grid { list-style: none; padding: 0; display: grid; gap: 14px;
          grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); }
ol.grid li { background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 6px; }
ol.grid img { display: block; width: 100%; height: 220px; object-fit: contain; background: #eee; }
.rank { font-weight: bold; } .score { float: right; color: #555; font-variant-numeric: tabular-nums; }
.path { display: block; font-size: 11px; color: #777; overflow-wrap: anywhere; }
"""


def image_url(path: str) -> str:
    """URL under which the server returns an indexed image (path relative to the image folder)."""
    return IMAGE_ROUTE + quote(os.fsencode(path), safe="/")  # the name's bytes, whatever its encoding


def render_page(about: str, query: str = "", k: int = DEFAULT_K, hits=(), message: str = "",
                error: bool = False) -> str:
    """The whole page: the form (keeping the query), a line about the index, a message, the ranked grid."""
    def esc(text: str) -> str:
        return html.escape(shown_name(text))
    title = f"{query} - CFine search" if query else "CFine search"
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        '<header><form method="get" action="/">',
        f'<input type="search" name="q" value="{esc(query)}" maxlength="{MAX_QUERY_CHARS}" autofocus '
        'placeholder="describe a person, e.g. a woman in a red coat with a black backpack" aria-label="description">',
        f'<label>top <input type="number" name="k" min="1" max="{MAX_K}" value="{k}"></label>',
        "<button type=\"submit\">Search</button></form>",
        f'<p class="about">{esc(about)}</p></header><main>',
    ]
    if message:
        parts.append(f'<p class="message{" error" if error else ""}">{esc(message)}</p>')
    if hits:
        parts.append('<ol class="grid">')
        for hit in hits:
            url = esc(image_url(hit.path))
            parts.append(f'<li><a href="{url}"><img class="result" src="{url}" alt="rank {hit.rank}: {esc(hit.path)}">'
                         f'</a><span class="rank">#{hit.rank}</span> <span class="score">{hit.score:.4f}</span>'
                         f'<span class="path">{esc(hit.path)}</span></li>')
        parts.append("</ol>")
    parts.append("</main></body></html>")
    return "\n".join(parts)
