"""Tokenize batches of documents, in this process or in ``num_proc`` worker processes.

Workers are a ``concurrent.futures.ProcessPoolExecutor`` (a dead worker raises instead of
hanging, as a ``multiprocessing.Pool`` would) started with ``fork`` where the platform has it:
``spawn`` would re-import the caller's ``__main__`` (the trap DESIGN.md section 3 notes for
``save_to_disk``) and costs seconds. Results come back in submission order, and at most
``2 * num_proc`` batches are in flight, so memory does not grow with the corpus and the output
does not depend on ``num_proc``.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from data_prep.tokenizer import Tokenizer

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, add_bos: bool, add_eos: bool) -> None:
    _WORKER["tok"] = Tokenizer(tokenizer_path)
    _WORKER["args"] = (add_bos, add_eos)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _WORKER["tok"].encode_batch(texts, *_WORKER["args"])


class Encoder:
    """``map(batches)`` turns ``(payload, texts)`` into ``(payload, token arrays)``, in order."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool, num_proc: int = 1):
        self.tokenizer, self.add_bos, self.add_eos, self.num_proc = tokenizer, add_bos, add_eos, num_proc
        self._pool = None
        if num_proc > 1:
            # HF tokenizers' Rust thread pool and fork do not mix (it warns, may deadlock).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                                             initargs=(str(tokenizer.file), add_bos, add_eos))
            # With fork, the executor starts all workers at the first submit: do it now, before the
            # caller starts threads (progress bar, Arrow) that a fork must not copy mid-operation.
            self._pool.submit(int).result()

    def map(self, batches: Iterable[tuple[object, list[str]]]) -> Iterator[tuple[object, list[np.ndarray]]]:
        if self._pool is None:
            for payload, texts in batches:
                yield payload, self.tokenizer.encode_batch(texts, self.add_bos, self.add_eos)
            return
        in_flight: deque = deque()
        for payload, texts in batches:
            in_flight.append((payload, self._pool.submit(_encode_in_worker, texts)))
            if len(in_flight) >= 2 * self.num_proc:
                payload0, future = in_flight.popleft()
                yield payload0, future.result()
        while in_flight:
            payload0, future = in_flight.popleft()
            yield payload0, future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
