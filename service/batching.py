"""Micro-batching: concurrent requests share one pass through the model.

Requests go into an asyncio queue. One worker task takes the first, then keeps collecting until it holds
`max_batch` of them or `max_wait_ms` have passed, and runs the batch in a thread so the event loop stays free to
accept uploads, answer health checks and refuse bad input while the model works. Each request waits on its own
future, and an error while captioning one image goes to that request only.

`CaptionRunner` is what the service batches: it runs the CNN over the batch's images (in passes of
`encoder_batch`) and decodes them in groups of identical decoding options (requests in one batch may ask for
different methods).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image

from captioner.inference import CaptionResult
from captioner.options import DecodingOptions

from .model import CaptionModel

logger = logging.getLogger("captioner.service")

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(RuntimeError):
    """The queue is full: the caller should answer 503 and ask the client to retry later."""


class NotRunning(RuntimeError):
    """The batcher was never started or has stopped."""


@dataclass
class BatchResult(Generic[R]):
    """What a submitted item came back with: its result and how its batch ran."""

    value: R
    batch_size: int  # requests that went through the model together
    queued_s: float  # from submit to the start of its batch
    inference_s: float  # the whole batch's run


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    sizes: Counter = field(default_factory=Counter)  # batch size -> how many batches had it

    def record(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.sizes[size] += 1

    @property
    def max_size(self) -> int:
        return max(self.sizes, default=0)


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future
    enqueued: float


class MicroBatcher(Generic[T, R]):
    """`run(items) -> one result or exception per item` is called in a worker thread, one batch at a time.

    A batch starts with the oldest waiting item and takes whatever else is waiting, up to `max_batch`. If it is
    still short, it waits up to `max_wait_ms` for more, but only while some request is on its way (inside
    `arriving()`: receiving or decoding its image). With nothing on the way no one can join, so a lone request
    goes straight to the model instead of paying the batching delay.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._waiting: deque[_Pending[T, R]] = deque()
        self._arriving = 0  # requests inside arriving(): they may join a batch that is forming
        self._wake = asyncio.Event()  # set on every enqueue and every arrival that ends
        self._task: asyncio.Task | None = None
        self.stats = BatchStats()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._waiting:  # nobody will run these any more: let their requests finish now
            pending = self._waiting.popleft()
            if not pending.future.done():
                pending.future.set_exception(NotRunning("the service is shutting down"))

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap a request's work before `enqueue` (receiving, decoding) so forming batches know it is coming."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wake.set()

    def enqueue(self, item: T) -> asyncio.Future[BatchResult[R]]:
        """Queue one item; the future gets its result. Cancelling the future (a timeout) drops it from its batch.
        Synchronous on purpose: called inside `arriving()`, the item is queued before the arrival ends."""
        if not self.running:
            raise NotRunning("the model worker is not running")
        if len(self._waiting) >= self.max_queue:
            raise Overloaded(f"{self.max_queue} requests are already waiting for the model")
        future: asyncio.Future[BatchResult[R]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(item, future, time.perf_counter()))
        self._wake.set()
        return future

    async def submit(self, item: T) -> BatchResult[R]:
        return await self.enqueue(item)

    async def _collect(self) -> list[_Pending[T, R]]:
        while not self._waiting:
            self._wake.clear()
            await self._wake.wait()
        batch = [self._waiting.popleft()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if self._waiting:  # already waiting: joins at once, even past the deadline (no idle model under load)
                batch.append(self._waiting.popleft())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if self._arriving == 0 or remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        while True:
            batch = [p for p in await self._collect() if not p.future.done()]  # done: its caller gave up
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outcomes = list(await asyncio.to_thread(self._run, [p.item for p in batch]))
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"batch runner returned {len(outcomes)} results for {len(batch)} items")
            except Exception as exc:  # a bug in the runner: fail this batch, keep serving the next ones
                logger.exception("batch of %d failed", len(batch))
                outcomes = [exc] * len(batch)
            elapsed = time.perf_counter() - started
            self.stats.record(len(batch))
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    done = BatchResult(outcome, len(batch), started - pending.enqueued, elapsed)
                    pending.future.set_result(done)


# --------------------------------------------------------------------------------------------------------------
# What the service batches.


@dataclass
class CaptionJob:
    pixels: Any  # (3, S, S) numpy array or torch tensor: the image decoded and preprocessed in the request's thread
    options: DecodingOptions

    @classmethod
    def from_image(cls, captioner: CaptionModel, image: Image.Image, options: DecodingOptions) -> CaptionJob:
        """Resize + normalise here rather than in the model's thread: that work then overlaps the model's."""
        return cls(captioner.preprocessing(image), options)


class CaptionRunner:
    """Encode a batch of images, decode them per group of identical options.

    The CNN sees at most `encoder_batch` images per pass (`Settings.resolved_encoder_batch`): the whole batch on a
    GPU, one image on a CPU. With eager torch, big batches of 448 px activations are slower per image, not faster
    (tensors past glibc's 32 MB mmap ceiling are page-faulted in afresh on every pass: lite0 64 ms/image alone,
    156 ms/image in batches of 8). ONNX Runtime alone does encode 16 images in one run in 0.71-0.79x the time of
    16 runs, but inside the service, whose request threads decode uploads on the same cores meanwhile, one image
    per run served more images/s (benchmarks/load_service.py at concurrency 16: 87-97% of the bare pipeline
    against 77-100%; docs/performance.md). The decoder always gets the whole group.
    """

    def __init__(self, captioner: CaptionModel, encoder_batch: int = 1):
        self.captioner = captioner
        self.encoder_batch = max(1, encoder_batch)

    def __call__(self, jobs: list[CaptionJob]) -> list[CaptionResult | BaseException]:
        features = self._encode([job.pixels for job in jobs])
        outcomes: list[CaptionResult | BaseException | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, (job, feature) in enumerate(zip(jobs, features, strict=True)):
            if isinstance(feature, BaseException):
                outcomes[i] = feature
            else:
                groups.setdefault(_group_key(job.options, i), []).append(i)
        for members in groups.values():
            try:
                batch = stack([features[i] for i in members])
                results = self.captioner.caption_features(batch, jobs[members[0]].options)
            except Exception as exc:
                logger.exception("decoding failed for %d image(s)", len(members))
                results = [exc] * len(members)
            for i, result in zip(members, results, strict=True):
                outcomes[i] = result
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def _encode(self, pixels: list[Any]) -> list[Any]:
        features: list[Any] = []
        for start in range(0, len(pixels), self.encoder_batch):
            features += self._encode_chunk(pixels[start : start + self.encoder_batch])
        return features

    def _encode_chunk(self, pixels: list[Any]) -> list[Any]:
        """One CNN pass (B, 3, S, S) -> B features (L, D); if it fails, image by image, so only the culprit
        gets the error (a BaseException in its place)."""
        try:
            return list(self.captioner.encode_pixels(stack(pixels)))
        except Exception as exc:
            if len(pixels) == 1:
                logger.exception("encoding failed")
                return [exc]
        return [self._encode_chunk([one])[0] for one in pixels]


def stack(rows: list[Any]) -> Any:
    """Rows of one shape -> one batch along a new first axis: numpy arrays (the slim engine) or torch tensors (the
    torch side's). Tensors only exist once torch is imported, so the import below never loads it afresh."""
    if isinstance(rows[0], np.ndarray):
        return np.stack(rows)
    import torch

    return torch.stack(rows)


def _group_key(options: DecodingOptions, index: int) -> tuple:
    # One generator serves a whole sampling batch, so a seeded sample would depend on its batch-mates: seeded
    # sampling runs alone, and the same seed gives the same captions whatever else the server is doing.
    if options.method == "sample" and options.seed is not None and options.temperature > 0:
        return (*astuple(options), index)
    return astuple(options)
