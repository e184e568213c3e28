"""One serve batch decoded step by step: the requests ``@serve.batch`` gathered, split into sub-batches
that share a ``model.generate.generate_steps`` iterator, all advanced one token per step.

``generate_steps`` takes one set of sampling settings per call, so a batch is split into sub-batches
that can share one: all greedy requests together; unseeded sampled requests with equal (temperature,
top_k, top_p); each seeded request alone, so a seed gives the same text as `raylm generate --seed`
whatever else is in flight. A sub-batch is also split when its longest prompt would leave a shorter
one less room than it asked for (left padding shares one context window).

A request fails alone: when a shared step raises (a checkpoint with non-finite weights, say), each of
its requests goes on by itself from where it is (its prompt plus the tokens it already has), so only
the ones that fail on their own get an error (a 500, or an error event once streaming) while the rest
are answered. A greedy request continues exactly as it would have; a sampled one samples from the
same distribution.

A request whose client went away (``Job.stop`` set before it finished) is dropped at the next step:
a sub-batch left with no one to answer is closed and a batch with no one left ends, so a
disconnected stream does not keep the replica decoding up to its max_tokens while the next batch
waits. A dropped row that shares its sub-batch with live requests is still computed beside them (a
row cannot leave a shared KV cache), so it costs nothing past their own end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from orchestration.deploy.serve_request import Job, RequestError

logger = logging.getLogger("ray.serve")

# (prompts, max new tokens, one member's Job for the shared settings) -> generate_steps' iterator
StartSteps = Callable[[list[list[int]], int, Job], Iterator[list[Optional[int]]]]


@dataclass
class Step:
    """What one request gets from one step of its batch."""

    tokens: list[int]  # new tokens (end-of-text excluded): one, or none on a stop
    finish_reason: Optional[str] = None  # on the request's last step: stop | length | context
    error: Optional[RequestError] = None  # the request failed by itself; it gets nothing more
    batch_size: int = 0  # requests in its serve batch
    generate_batch_size: int = 0  # requests sharing its generate_steps iterator


def wanted(job: Job, block_size: int) -> int:
    """Tokens this request can get alone: its max_tokens, cut where the context window ends."""
    return min(job.max_tokens, block_size + 1 - len(job.ids))


def plan_sub_batches(jobs: list[Job], block_size: int) -> list[list[int]]:
    """Indices of ``jobs`` grouped into shared ``generate_steps`` calls (see the module docstring)."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.temperature == 0:
            key: tuple = ("greedy",)
        elif job.seed is not None:
            key = ("seeded", i)
        else:
            key = ("sampled", job.temperature, job.top_k, job.top_p)
        groups.setdefault(key, []).append(i)
    plan = []
    for members in groups.values():
        # generate_steps gives every row block_size + 1 - (longest prompt) steps at most
        rest = sorted(members, key=lambda i: len(jobs[i].ids), reverse=True)
        while rest:
            room = block_size + 1 - len(jobs[rest[0]].ids)
            batch = [i for i in rest if wanted(jobs[i], block_size) <= room]
            plan.append(batch)
            rest = [i for i in rest if i not in batch]
    return plan


@dataclass
class _Group:
    members: list[int]  # indices into the batch's jobs
    steps: Iterator[list[Optional[int]]]


class BatchDecoder:
    """Decodes one serve batch: ``step()`` advances every sub-batch by one token and says what each
    request got. Not thread-safe; call ``step`` from one thread at a time (it blocks on the model).

    ``start_steps`` starts a ``generate_steps`` iterator; ``eot`` is the end-of-text token; ``stats``
    (the replica's counters) gets "generate_calls" per iterator started, "failed" per request that
    failed alone and "abandoned" per request dropped because its client went away.
    """

    def __init__(self, jobs: list[Job], start_steps: StartSteps, *, block_size: int, eot: int, stats: dict):
        self.jobs = jobs
        self.block_size = block_size
        self.eot = eot
        self.stats = stats
        self._start_steps = start_steps
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.finished = [False] * len(jobs)
        self.groups: list[_Group] = []
        for members in plan_sub_batches(jobs, block_size):
            self._start(members)

    @property
    def done(self) -> bool:
        return all(self.finished)

    def step(self) -> list[Optional[Step]]:
        """One token for every unfinished request: a Step each, None for those finished before (or
        dropped now because nobody reads them)."""
        for i, job in enumerate(self.jobs):
            if not self.finished[i] and job.stop.is_set():
                self.finished[i] = True
                self.stats["abandoned"] += 1
        out: list[Optional[Step]] = [None] * len(self.jobs)
        for group in list(self.groups):
            if all(self.finished[i] for i in group.members):
                self._close(group)
                continue
            for i, s in self._advance(group).items():
                out[i] = s
        return out

    def _start(self, members: list[int]) -> _Group:
        """A sub-batch continuing its members from where they are (their prompt + the tokens they have)."""
        first = self.jobs[members[0]]  # a sub-batch shares its sampling settings
        prompts = [self.jobs[i].ids + self.tokens[i] for i in members]
        steps = max(wanted(self.jobs[i], self.block_size) - len(self.tokens[i]) for i in members)
        self.stats["generate_calls"] += 1
        group = _Group(members, self._start_steps(prompts, steps, first))
        self.groups.append(group)
        return group

    def _advance(self, group: _Group) -> dict[int, Step]:
        try:
            new = next(group.steps, None)
        except Exception as err:
            self.groups.remove(group)
            return self._isolate(group, err)
        out: dict[int, Step] = {}
        for i, token in zip(group.members, new or [None] * len(group.members)):
            if not self.finished[i]:
                out[i] = self._take(i, token, len(group.members))
        if all(self.finished[i] for i in group.members):
            self._close(group)
        return out

    def _close(self, group: _Group) -> None:
        self.groups.remove(group)
        close = getattr(group.steps, "close", None)
        if close is not None:
            close()  # frees its KV cache now, not at garbage collection

    def _isolate(self, group: _Group, err: Exception) -> dict[int, Step]:
        """A shared step failed: each member goes on alone; one that fails alone gets the error."""
        if len(group.members) > 1:
            logger.warning("generate failed for a sub-batch of %d (%s); retrying each alone", len(group.members), err)
            out: dict[int, Step] = {}
            for i in group.members:
                if not self.finished[i]:
                    out.update(self._advance(self._start([i])))
            return out
        (i,) = group.members
        logger.error("generate failed for a request (prompt of %d tokens)", len(self.jobs[i].ids), exc_info=err)
        self.stats["failed"] += 1
        self.finished[i] = True
        error = RequestError(500, f"generation failed for this request: {type(err).__name__}: {err}")
        return {i: Step([], "error", error, len(self.jobs), 1)}

    def _take(self, i: int, token: Optional[int], shared: int) -> Step:
        """Request i's next token (None: its iterator ended, the context is full) -> its Step."""
        if token is None or token == self.eot:
            self.finished[i] = True
            return Step([], "stop" if token == self.eot else "context", None, len(self.jobs), shared)
        self.tokens[i].append(token)
        job = self.jobs[i]
        if len(self.tokens[i]) >= wanted(job, self.block_size):
            self.finished[i] = True
            reason = "length" if len(self.tokens[i]) >= job.max_tokens else "context"
            return Step([token], reason, None, len(self.jobs), shared)
        return Step([token], None, None, len(self.jobs), shared)
