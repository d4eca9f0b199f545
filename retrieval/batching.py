"""Searches that arrive together run together: `search.py serve`'s requests hand their sentence to one worker
thread, which encodes every sentence waiting at that moment in one batch (up to MAX_BATCH) and ranks them at once.

One model, used by one thread (bounded memory, no lock around it); under load a batch costs little more than a lone
sentence (on the development VM's tiny model: 5 ms for one sentence, 22 ms for 25), so a search's wait stays near
two batches instead of growing with every search queued before it. Each sentence's hits are the top k of the batch's
largest k, cut to its own k: the ranking is a total order (ties by index position, retrieval/ranking.py), so that
prefix is exactly its own top k. A caption's feature is computed in a batch of others, so its scores may differ from
a lone query's in the last float digits.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from retrieval.text_search import Hit, TextSearch

MAX_BATCH = 64


@dataclass
class _Request:
    caption: str
    k: int
    done: threading.Event = field(default_factory=threading.Event)
    hits: list[Hit] | None = None
    truncated: bool = False
    error: BaseException | None = None


class BatchedSearch:
    """search(caption, k) from any thread; a daemon worker runs the batches."""

    def __init__(self, search: TextSearch, max_batch: int = MAX_BATCH):
        self.text_search, self.max_batch = search, max_batch
        self._waiting: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        threading.Thread(target=self._work, name="search-batches", daemon=True).start()

    def search(self, caption: str, k: int) -> tuple[list[Hit], bool]:
        """(the top k hits, whether the caption was longer than the text encoder reads); blocks until its batch ran.
        A failure of the batch is raised here, in every request of that batch."""
        request = _Request(caption, k)
        self._waiting.put(request)
        request.done.wait()
        if request.error is not None:
            raise RuntimeError(f"the batched search failed: {request.error!r}") from request.error
        return request.hits, request.truncated

    def _work(self) -> None:
        while True:
            batch = [self._waiting.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        try:
            captions = [request.caption for request in batch]
            truncated = self.text_search.model.truncated(captions)
            ranked = self.text_search.search(captions, max(request.k for request in batch), warn_truncated=False)
            for request, hits, cut in zip(batch, ranked, truncated):
                request.hits, request.truncated = hits[:request.k], cut
        except Exception as error:  # reported to each request's thread, which answers 500; the worker goes on
            for request in batch:
                request.error = error
        finally:
            for request in batch:
                request.done.set()
