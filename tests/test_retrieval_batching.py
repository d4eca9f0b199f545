"""retrieval/batching.py: sentences waiting together are ranked in one batch, each answer equal to its own search
(top k of its own k, its own truncation note); a failing batch fails its requests only; and with the real model a
batched answer ranks as the lone search does."""
import threading
import time

import pytest
import torch

import search
from retrieval.batching import BatchedSearch
from retrieval.text_search import Hit, load_text_search

pytestmark = pytest.mark.usefixtures("single_thread")


class GatedSearch:
    """A TextSearch stand-in: caption i ranks images by (i + j) % 7 descending; its first batch waits for a gate, so
    every request sent meanwhile queues up for the next batch."""

    def __init__(self):
        self.batches, self.gate, self.fail = [], threading.Event(), False
        self.model = self

    def truncated(self, captions):
        return [len(caption) > 12 for caption in captions]

    def search(self, captions, k, warn_truncated=True):
        assert warn_truncated is False  # the server shows its own note, never a warning per batch in its log
        self.batches.append(list(captions))
        if len(self.batches) == 1:
            self.gate.wait(30)
        if self.fail:
            raise ValueError("no memory left")
        return [lone_hits(caption, k) for caption in captions]


def lone_hits(caption: str, k: int) -> list[Hit]:
    i = int(caption.split()[-1])
    order = sorted(range(20), key=lambda j: (-((i + j) % 7), j))  # a total order, ties by position
    return [Hit(rank + 1, float((i + j) % 7), f"{j}.png") for rank, j in enumerate(order[:k])]


def send_all(batched, requests):
    answers, threads = [None] * len(requests), []
    for n, (caption, k) in enumerate(requests):
        def ask(n=n, caption=caption, k=k):
            try:
                answers[n] = batched.search(caption, k)
            except RuntimeError as error:
                answers[n] = error
        threads.append(threading.Thread(target=ask))
        threads[-1].start()
    return answers, threads


def test_requests_waiting_together_run_as_one_batch_each_with_its_own_k_and_note():
    fake = GatedSearch()
    batched = BatchedSearch(fake)
    first, first_threads = send_all(batched, [("someone 0", 3)])
    while not fake.batches:
        time.sleep(0.01)
    requests = [(("a longer sentence " if n % 3 == 0 else "short ") + str(n), 1 + n % 5) for n in range(1, 31)]
    answers, threads = send_all(batched, requests)
    time.sleep(0.5)  # every request is queued behind the gated first batch
    fake.gate.set()
    for thread in first_threads + threads:
        thread.join(30)
    assert [len(batch) for batch in fake.batches] == [1, 30]  # the 30 waiting sentences: one batch
    assert first == [(lone_hits("someone 0", 3), False)]
    for (caption, k), answer in zip(requests, answers):
        assert answer == (lone_hits(caption, k), len(caption) > 12)


def test_a_failing_batch_fails_its_requests_and_the_next_batch_runs():
    fake = GatedSearch()
    fake.gate.set()
    fake.fail = True
    batched = BatchedSearch(fake)
    with pytest.raises(RuntimeError, match="the batched search failed: ValueError"):
        batched.search("someone 1", 2)
    fake.fail = False
    assert batched.search("someone 2", 2) == (lone_hits("someone 2", 2), False)


def test_with_the_model_a_batched_answer_ranks_as_the_lone_search(tiny_checkpoint, test_split_photos, tmp_path):
    index = tmp_path / "index"
    assert search.main(search.get_args_parser().parse_args([
        "index", "--checkpoint", str(tiny_checkpoint), "--images", str(test_split_photos), "--out", str(index),
        "--device", "cpu", "--workers", "0", "--no_progress"])) == 0
    text_search = load_text_search(index, torch.device("cpu"))
    batched = BatchedSearch(text_search)
    captions = ["a man in a red coat", "a woman with a black backpack " * 20, "someone in white shoes"]
    answers, threads = send_all(batched, [(caption, k) for caption, k in zip(captions, (3, 5, 12))])
    for thread in threads:
        thread.join(60)
    for (hits, truncated), caption, k in zip(answers, captions, (3, 5, 12)):
        lone = text_search.search([caption], k, warn_truncated=False)[0]
        assert [h.path for h in hits] == [h.path for h in lone] and len(hits) == k
        assert [h.score for h in hits] == pytest.approx([h.score for h in lone], abs=1e-5)
        assert truncated == (caption.count("backpack") > 1)
