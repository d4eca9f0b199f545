"""`search.py serve`: the standard library's threading HTTP server in front of one TextSearch.

    GET /?q=TEXT&k=N    the page; with q, the top N images (rendered on the server, so a result is a link)
    GET /image/PATH     an image listed in the index that still resolves inside its folder; anything else 404
Bad queries (empty, longer than MAX_QUERY_CHARS, k not a whole number of ASCII digits in 1..MAX_K) get 400 and the
reason on the page; an unexpected failure gets 500 and a short page, the traceback going to the server's log only.

What a client can hold (HTTP/1.0: one request per connection):
- the listen backlog is BACKLOG connections (the kernel queues that many before refusing new ones);
- a connection's request line and headers must all arrive within REQUEST_TIMEOUT_S of its acceptance (one deadline
  for the whole request head, so a client trickling a byte at a time is cut off as surely as an idle one; a bare
  HTTP/0.9 `GET /` with no headers waits for headers and is closed too); sending the answer has the same timeout
  per write;
- at most MAX_HANDLERS connections are handled at once, each on its own thread; a connection beyond that is answered
  at once with 503 and Retry-After from the accepting thread and closed, so no client creates threads without bound.
Searches are handed to one worker that runs those arriving together as one batch (retrieval/batching.py: one
model, bounded memory); pages and images are served in parallel.
"""
from __future__ import annotations

import io
import mimetypes
import os
import socket
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from retrieval.batching import BatchedSearch
from retrieval.image_folder import shown_name
from retrieval.page import DEFAULT_K, IMAGE_ROUTE, MAX_K, MAX_QUERY_CHARS, render_page
from retrieval.text_search import TextSearch
from utils.errors import SettingError

BACKLOG = 128
REQUEST_TIMEOUT_S = 5.0
MAX_HANDLERS = 64
MAX_FIELDS = 100  # query-string fields parsed (the page sends two)
_BUSY_TEXT = b"The search server is busy: retry in a moment.\n"
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT))


class BadRequest(ValueError):
    """A query the page answers with 400 and this message."""


def _whole_number(text: str) -> int | None:
    """The value of a string of ASCII digits within 1..MAX_K (leading zeros allowed), else None; never raises (no
    int() of other digits such as '²', nor of thousands of them)."""
    digits = text.lstrip("0")
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(MAX_K)):
        return None
    value = int(digits or "0")
    return value if 1 <= value <= MAX_K else None


def parse_search(query_string: str) -> tuple[str | None, int]:
    """(query text or None when absent, k) from a URL's query string; raises BadRequest with the reason, and nothing
    else."""
    try:
        params = parse_qs(query_string, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        raise BadRequest(f"The address holds more than {MAX_FIELDS} fields; the page needs q and k.") from None
    raw_k = params.get("k", [str(DEFAULT_K)])[0].strip() or str(DEFAULT_K)
    k = _whole_number(raw_k)
    if k is None:
        raise BadRequest(f"k must be a whole number from 1 to {MAX_K} (the number of images to show), "
                         f"not {raw_k[:20]!r}")
    if "q" not in params:
        return None, k
    query = params["q"][0].strip()
    if not query:
        raise BadRequest("The query is empty: type a description of the person to look for.")
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(f"The query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}. "
                         "Shorten it (the text encoder reads only its first 77 CLIP or 100 BERT tokens anyway).")
    return query, k


def _shown(path) -> str:
    """A path as the page shows it: relative to the working folder when inside it (shorter, no home folder)."""
    relative = os.path.relpath(path)
    return shown_name(str(path) if relative.startswith("..") else relative)


class SearchServer(ThreadingHTTPServer):
    """Holds the search; requests run in threads (at most max_handlers at once), searches in batches."""

    daemon_threads = True
    request_queue_size = BACKLOG  # socketserver's listen() backlog (its default is 5)

    def __init__(self, address: tuple[str, int], search: TextSearch, request_timeout: float = REQUEST_TIMEOUT_S,
                 max_handlers: int = MAX_HANDLERS):
        self.request_timeout, self.max_handlers = request_timeout, max_handlers
        self.handler_slots = threading.BoundedSemaphore(max_handlers)
        super().__init__(address, SearchHandler)
        self.search, self.batched = search, BatchedSearch(search)
        index = search.index
        self.about = (f"{len(index.images)} images in {_shown(index.image_root)} · "
                      f"checkpoint {_shown(index.checkpoint['path'])}")

    def process_request(self, request, client_address) -> None:
        """A thread for the connection if fewer than max_handlers are running, else 503 and close, at once."""
        if not self.handler_slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else will give the slot back
            self.handler_slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.handler_slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 from the accepting thread, never blocking it: what the client sent so far is read (closing over unread
        data would reset the connection before the answer arrives), the answer written if it fits, then close."""
        try:
            request.setblocking(False)
            try:
                request.recv(65536)
            except BlockingIOError:
                pass
            request.send(BUSY)
        except OSError:
            pass
        self.shutdown_request(request)


def serve(search: TextSearch, host: str, port: int) -> None:
    """Serve the search page on host:port (0: a free port), printing its URL, until Ctrl-C."""
    try:
        server = SearchServer((host, port), search)
    except OSError as error:
        raise SettingError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); "
                           "pass another --port (0 picks a free one)") from None
    host, port = server.server_address[:2]
    print(shown_name(f"serving {len(search.index.images)} images of {search.index.image_root} at http://{host}:{port}/ "
                     f"(up to {MAX_K} results per query; Ctrl-C stops)"), flush=True)
    if host not in ("127.0.0.1", "localhost"):
        print(f"note: --host {host} makes the page reachable from other machines", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how the server is meant to stop
    finally:
        server.server_close()


class _HeadReader(io.RawIOBase):
    """The connection's receiving side, with one deadline for everything read (the request line and headers)."""

    def __init__(self, connection: socket.socket, seconds: float):
        self.connection, self.deadline = connection, time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request line and headers did not arrive in time")
        self.connection.settimeout(left)
        return self.connection.recv_into(buffer)


class SearchHandler(BaseHTTPRequestHandler):
    """GET only: the page or an indexed image."""

    server: SearchServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # StreamRequestHandler applies it to the socket (each write)
        super().setup()
        self.rfile.close()  # replaced by a reader with one deadline for the whole request head
        self.rfile = io.BufferedReader(_HeadReader(self.connection, self.timeout))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.connection.settimeout(self.timeout)  # the head is read: the answer's writes get the timeout each
        try:
            try:
                url = urlsplit(self.path)
            except ValueError as error:  # e.g. an absolute-form address with a broken [IPv6] host
                self._send_html(HTTPStatus.BAD_REQUEST, render_page(self.server.about, message=f"The address cannot "
                                                                    f"be read ({error}).", error=True))
                return
            if url.path == "/":
                self._page(url.query)
            elif url.path.startswith(IMAGE_ROUTE):
                # http.server decoded the request line as Latin-1: back to its bytes, unquoted, then the file name
                # those bytes are (a name that is not UTF-8 included).
                self._image(os.fsdecode(unquote_to_bytes(url.path[len(IMAGE_ROUTE):].encode("latin-1"))))
            else:
                self._send_html(HTTPStatus.NOT_FOUND, render_page(self.server.about, message=f"No page at {url.path}.",
                                                                  error=True))
        except (ConnectionError, TimeoutError):  # the client went away or stopped reading: nobody to answer
            self.close_connection = True
        except Exception:  # the visitor gets a short page; the log gets the traceback
            traceback.print_exc()
            self._send_html(HTTPStatus.INTERNAL_SERVER_ERROR, render_page(
                self.server.about, message="The search failed on the server (the details are in its log).", error=True))

    def _page(self, query_string: str) -> None:
        try:
            query, k = parse_search(query_string)
        except BadRequest as error:
            raw = parse_qs(query_string, keep_blank_values=True, max_num_fields=None).get("q", [""])[0]
            self._send_html(HTTPStatus.BAD_REQUEST, render_page(self.server.about, raw[:MAX_QUERY_CHARS], DEFAULT_K,
                                                                message=str(error), error=True))
            return
        if query is None:
            self._send_html(HTTPStatus.OK, render_page(self.server.about, k=k))
            return
        hits, truncated = self.server.batched.search(query, k)
        note = "The description is longer than the text encoder reads; only its beginning was used." if truncated else ""
        self._send_html(HTTPStatus.OK, render_page(self.server.about, query, k, hits, message=note))

    def _image(self, relative: str) -> None:
        path = self.server.search.index.servable_file(relative)
        if path is None:
            self._send_html(HTTPStatus.NOT_FOUND, render_page(self.server.about, message="No such image in this index.",
                                                              error=True))
            return
        try:
            body = path.read_bytes()
        except OSError as error:  # removed or made unreadable since the check
            self._send_html(HTTPStatus.NOT_FOUND, render_page(self.server.about, message=f"The image cannot be read "
                                                              f"({error.strerror}).", error=True))
            return
        self._send(HTTPStatus.OK, mimetypes.guess_type(path.name)[0] or "application/octet-stream", body)

    def _send_html(self, status: HTTPStatus, page: str) -> None:
        # render_page shows every file name printably; backslashreplace only guards against a slip (never a 500).
        self._send(status, "text/html; charset=utf-8", page.encode("utf-8", "backslashreplace"))

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)
