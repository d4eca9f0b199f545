"""`search.py serve`: the standard library's threading HTTP server in front of one TextSearch.

    GET /?q=TEXT&k=N    the page; with q, the top N images (rendered on the server, so a result is a link)
    GET /image/PATH     an image listed in the index that still resolves inside its folder; anything else 404
Bad queries (empty, longer than MAX_QUERY_CHARS, k not a whole number in 1..MAX_K) get 400 and the reason
on the page; an unexpected failure gets 500 and a short page, the traceback going to the server's log only.
"""
from __future__ import annotations

import mimetypes
import os
import threading
import traceback
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from retrieval.page import DEFAULT_K, IMAGE_ROUTE, MAX_K, MAX_QUERY_CHARS, render_page
from retrieval.text_search import TextSearch
from utils.errors import SettingError


class BadRequest(ValueError):
    """A query the page answers with 400 and this message."""


def parse_search(query_string: str) -> tuple[str | None, int]:
    """(query text or None when absent, k) from a URL's query string; raises BadRequest with the reason."""
    params = parse_qs(query_string, keep_blank_values=True)
    raw_k = params.get("k", [str(DEFAULT_K)])[0].strip() or str(DEFAULT_K)
    if not raw_k.isdigit() or not 1 <= int(raw_k) <= MAX_K:
        raise BadRequest(f"k must be a whole number from 1 to {MAX_K} (the number of images to show), "
                         f"not {raw_k[:20]!r}")
    if "q" not in params:
        return None, int(raw_k)
    query = params["q"][0].strip()
    if not query:
        raise BadRequest("The query is empty: type a description of the person to look for.")
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(f"The query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}. "
                         "Shorten it (the text encoder reads only its first 77 CLIP or 100 BERT tokens anyway).")
    return query, int(raw_k)


def _shown(path) -> str:
    """A path as the page shows it: relative to the working folder when inside it (shorter, no home folder)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


class SearchServer(ThreadingHTTPServer):
    """Holds the search; requests run in threads, searches one at a time (bounded memory, one model)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], search: TextSearch):
        super().__init__(address, SearchHandler)
        self.search, self.lock = search, threading.Lock()
        index = search.index
        self.about = (f"{len(index.images)} images in {_shown(index.image_root)} · "
                      f"checkpoint {_shown(index.checkpoint['path'])}")


def serve(search: TextSearch, host: str, port: int) -> None:
    """Serve the search page on host:port (0: a free port), printing its URL, until Ctrl-C."""
    try:
        server = SearchServer((host, port), search)
    except OSError as error:
        raise SettingError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); "
                           "pass another --port (0 picks a free one)") from None
    host, port = server.server_address[:2]
    print(f"serving {len(search.index.images)} images of {search.index.image_root} at http://{host}:{port}/ "
          f"(up to {MAX_K} results per query; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost"):
        print(f"note: --host {host} makes the page reachable from other machines", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how the server is meant to stop
    finally:
        server.server_close()


class SearchHandler(BaseHTTPRequestHandler):
    """GET only: the page or an indexed image."""

    server: SearchServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            url = urlsplit(self.path)
            if url.path == "/":
                self._page(url.query)
            elif url.path.startswith(IMAGE_ROUTE):
                self._image(unquote(url.path[len(IMAGE_ROUTE):]))
            else:
                self._send_html(HTTPStatus.NOT_FOUND, render_page(self.server.about, message=f"No page at {url.path}.",
                                                                  error=True))
        except Exception:  # the visitor gets a short page; the log gets the traceback
            traceback.print_exc()
            self._send_html(HTTPStatus.INTERNAL_SERVER_ERROR, render_page(
                self.server.about, message="The search failed on the server (the details are in its log).", error=True))

    def _page(self, query_string: str) -> None:
        try:
            query, k = parse_search(query_string)
        except BadRequest as error:
            raw = parse_qs(query_string, keep_blank_values=True).get("q", [""])[0][:MAX_QUERY_CHARS]
            self._send_html(HTTPStatus.BAD_REQUEST, render_page(self.server.about, raw, DEFAULT_K, message=str(error),
                                                                error=True))
            return
        if query is None:
            self._send_html(HTTPStatus.OK, render_page(self.server.about, k=k))
            return
        with self.server.lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hits = self.server.search.search([query], k)[0]
        note = ""
        if any("truncated" in str(warning.message) for warning in caught):  # model.tokenize's warning
            note = "The description is longer than the text encoder reads; only its beginning was used."
        self._send_html(HTTPStatus.OK, render_page(self.server.about, query, k, hits, message=note))

    def _image(self, relative: str) -> None:
        path = self.server.search.index.servable_file(relative)
        if path is None:
            self._send_html(HTTPStatus.NOT_FOUND, render_page(self.server.about, message="No such image in this index.",
                                                              error=True))
            return
        self._send(HTTPStatus.OK, mimetypes.guess_type(path.name)[0] or "application/octet-stream", path.read_bytes())

    def _send_html(self, status: HTTPStatus, page: str) -> None:
        self._send(status, "text/html; charset=utf-8", page.encode("utf-8"))

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)
