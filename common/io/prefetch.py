"""Read ahead: run `load(step)` for upcoming steps in background threads while the caller works.

File reads (os.preadv) and torch copies release the GIL, so reading the next tensors from
disk overlaps the device computing on the current ones.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

S = TypeVar("S")
R = TypeVar("R")


def prefetched(steps: Iterable[S], load: Callable[[S], R], depth: int = 2) -> Iterator[tuple[S, R]]:
    """Yield (step, load(step)) in order, with up to `depth` loads running ahead."""
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="prefetch") as pool:
        pending: deque[tuple[S, Future]] = deque()
        upcoming = iter(steps)
        try:
            for step in upcoming:
                pending.append((step, pool.submit(load, step)))
                if len(pending) >= depth:
                    break
            while pending:
                step, future = pending.popleft()
                for following in upcoming:
                    pending.append((following, pool.submit(load, following)))
                    break
                yield step, future.result()
        finally:
            for _, future in pending:
                future.cancel()
