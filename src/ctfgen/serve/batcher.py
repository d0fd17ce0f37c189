"""Many users, one sampler: concurrent requests merged into one pipeline call.

One worker thread owns the pipeline (its models keep decoding caches, so two calls must not overlap). Requests
wait in a queue; when the worker is free it takes the oldest one and every other waiting request with the same
settings (`SamplingRequest.settings`), up to `max_batch` images in all, and samples them in one call, each
image with the (seed, index) pair of its own request: every user gets the images they would get alone
(up to a near-tie that the batch shape can flip in float32; see `CTFPipeline.__call__`). While the
autoregressive stage runs, each request receives its rows of the tokens so far, for its streamed preview, and
their picture: drawn once for the whole call on a thread of its own, beside the sampler (a thread per user
drawing their own would fight the sampler for the cores).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from ctfgen.errors import CtfgenError
from ctfgen.pipeline import CTFPipeline
from ctfgen.sampling.request import PipelineOutput, SamplingRequest, merged


@dataclass(frozen=True)
class Progress:
    """The autoregressive stage's tokens so far for one request's images, LongTensor [n, step], and their picture,
    uint8 [n, 3, H, W] (None when the batcher draws none)."""

    step: int
    tokens: torch.Tensor
    pixels: torch.Tensor | None = None


class Job:
    """A request in flight: the worker posts its newest progress, then its result (or an error)."""

    def __init__(self, request: SamplingRequest):
        self.request = request
        self._posted = threading.Condition()
        self._progress: Progress | None = None
        self._outcome: PipelineOutput | BaseException | None = None

    def progress(self, progress: Progress) -> None:
        with self._posted:
            self._progress = progress
            self._posted.notify_all()

    def finish(self, outcome: PipelineOutput | BaseException) -> None:
        with self._posted:
            self._outcome = outcome
            self._posted.notify_all()

    def updates(self, timeout: float = 600.0):
        """Progress, then the request's PipelineOutput. A slow reader skips to the newest progress rather than
        falling behind the sampler, but always gets the last one before the result (the full preview)."""
        shown = None
        while True:
            with self._posted:
                if not self._posted.wait_for(partial(self._news_since, shown), timeout):
                    raise CtfgenError(f"no answer from the sampler in {timeout:.0f} s; try again")
                progress, outcome = self._progress, self._outcome
            if progress is not shown:
                shown = progress
                yield progress
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                yield outcome
                return

    def _news_since(self, shown: Progress | None) -> bool:
        return self._progress is not shown or self._outcome is not None

    def result(self, timeout: float = 600.0) -> PipelineOutput:
        *_, output = self.updates(timeout)
        return output


def post_progress(spans: list[tuple[Job, int, int]], step: int, tokens: torch.Tensor,
                  pixels: torch.Tensor | None = None) -> None:
    """Hand each request of a call (its rows lo:hi) its part of the call's progress."""
    for job, lo, hi in spans:
        job.progress(Progress(step, tokens[lo:hi], None if pixels is None else pixels[lo:hi]))


class Previews:
    """Pictures of the tokens so far of one sampler call, drawn on a thread of their own while the sampler goes
    on, and handed to each request as its rows. A frame posted while another is being drawn replaces the one
    still waiting, if any: the pictures follow the sampler, never lag behind it."""

    def __init__(self, draw: Callable[[torch.Tensor], torch.Tensor], spans: list[tuple[Job, int, int]]):
        self._draw, self._spans = draw, spans
        self._waiting: tuple[int, torch.Tensor] | None = None
        self._closed, self._error = False, None
        self._posted = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ctfgen-previews", daemon=True)
        self._thread.start()

    def post(self, step: int, tokens: torch.Tensor) -> None:
        with self._posted:
            self._waiting = (step, tokens)
            self._posted.notify()

    def close(self) -> None:
        """Draw the frame still waiting (the last one is the whole coarse grid), then stop; raises what drawing
        raised."""
        with self._posted:
            self._closed = True
            self._posted.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._posted:
                self._posted.wait_for(lambda: self._waiting is not None or self._closed)
                if self._waiting is None:
                    return
                (step, tokens), self._waiting = self._waiting, None
            try:
                pixels = self._draw(tokens)
            except Exception as e:  # the worker hears of it when the call ends
                self._error = e
                return
            post_progress(self._spans, step, tokens, pixels)


class Batcher:
    """Merges the requests that wait together into one pipeline call. `max_waiting` requests may wait at once;
    one more is refused with a message (the server is busy) rather than queued without bound. `preview(mode,
    tokens [n, step])`, if given, draws the tokens so far as uint8 images [n, 3, H, W] for the progress."""

    def __init__(self, pipe: CTFPipeline, *, max_batch: int = 64, max_waiting: int = 32, gather_s: float = 0.05,
                 progress_every: int = 8, preview: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        self.pipe, self.max_batch, self.max_waiting = pipe, max_batch, max_waiting
        self.gather_s, self.progress_every, self.preview = gather_s, progress_every, preview
        self.calls = 0  # sampler calls made so far: fewer than requests when they shared calls
        self._waiting: list[Job] = []
        self._changed = threading.Condition()
        self._pipeline_lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="ctfgen-batcher", daemon=True)
        self._worker.start()

    def submit(self, request: SamplingRequest) -> Job:
        """Queue a request (checked against the pipeline here, so that a bad one never joins a shared call)."""
        request = request.check(self.pipe)
        if request.count > self.max_batch:
            raise CtfgenError(f"{request.count} images in one request; at most {self.max_batch}")
        job = Job(request)
        with self._changed:
            if self._closed:
                raise CtfgenError("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise CtfgenError(f"the server is busy: {len(self._waiting)} requests are waiting (at most "
                                  f"{self.max_waiting}); try again in a moment")
            self._waiting.append(job)
            self._changed.notify()
        return job

    @property
    def waiting(self) -> int:
        """Requests waiting for the sampler (not those in the call that runs)."""
        with self._changed:
            return len(self._waiting)

    @contextmanager
    def pipeline(self):
        """The pipeline for work outside the batcher (re-rolls), while no sampler call runs."""
        with self._pipeline_lock:
            yield self.pipe

    def close(self) -> None:
        """Stop after the call that runs; the requests still waiting are told the server is shutting down."""
        with self._changed:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._changed.notify()
        for job in waiting:
            job.finish(CtfgenError("the server is shutting down; try again later"))
        self._worker.join()

    # -- the worker ------------------------------------------------------------------------------

    def _serve(self) -> None:
        while (jobs := self._take()) is not None:
            self._sample(jobs)

    def _take(self) -> list[Job] | None:
        """The oldest waiting request and those that can share its call; None once closed."""
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
        time.sleep(self.gather_s)  # requests sent together reach the queue up to tens of ms apart: let them join
        with self._changed:
            if self._closed:  # closing emptied the queue meanwhile
                return None
            settings, taken, size = self._waiting[0].request.settings, [], 0
            for job in self._waiting:
                if job.request.settings == settings and size + job.request.count <= self.max_batch:
                    taken.append(job)
                    size += job.request.count
            self._waiting = [job for job in self._waiting if job not in taken]
        return taken

    def _sample(self, jobs: list[Job]) -> None:
        spans, start = [], 0
        for job in jobs:
            spans.append((job, start, start + job.request.count))
            start = spans[-1][2]

        mode = jobs[0].request.mode
        previews = None if self.preview is None else Previews(partial(self.preview, mode), spans)

        def on_step(first: int, step: int, tokens: torch.Tensor) -> None:  # first is 0: the call is one batch
            if previews is not None:
                previews.post(step, tokens.clone())
            else:
                post_progress(spans, step, tokens.clone())

        try:
            with self._pipeline_lock:
                self.calls += 1
                try:
                    out = self.pipe.sample(merged([job.request for job in jobs]), batch_size=start,
                                           output_type="pt", callback=on_step, callback_steps=self.progress_every)
                finally:
                    if previews is not None:
                        previews.close()
        except Exception as e:  # every user of the call hears of it; the worker serves on
            for job in jobs:
                job.finish(e)
            return
        for job, lo, hi in spans:
            job.finish(PipelineOutput(out.images[lo:hi], out.labels[lo:hi], out.tokens[lo:hi],
                                   None if out.coarse is None else out.coarse[lo:hi]))
