"""A step's rewards scored in parallel: a process pool over the registered reward functions.

`math_verify` costs milliseconds to seconds per sample (sympy parsing and comparison) and guards
each parse with a SIGALRM timeout, which only works in a process's main thread: threads would have
to switch the timeouts off, so the pool is a `concurrent.futures.ProcessPoolExecutor` (its workers
run every task in their main thread; the `spawn` start method, so no copy of the driver's torch
threads or CUDA state is forked). The rewards are pure functions of (response, answer): pooled
scores are the serial ones, in order (`tests/integration/test_reward_processes.py`).

Worker count: `reward.workers` (null: `min(8, cpu_count)` for `math_verify`, in-process for
`exact_match`, whose string compare costs less than sending it to a worker; 0 or 1: in-process).
A pool that dies (a worker killed) or a step that runs past its deadline raises `RewardPoolError`
naming the key, instead of hanging the run.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool

from nemo_rl_fp16.data.rewards import REWARDS

#: seconds one sample may take in a worker before the step is declared hung: math_verify's own
#: timeouts bound a sample at 3 x 5 s (two parses and a verify); the rest is slack for a loaded host
SECONDS_PER_SAMPLE = 30.0


class RewardPoolError(RuntimeError):
    """The reward pool failed (a worker died) or did not answer in time."""


def resolve_workers(name: str, workers: int | None) -> int:
    """The number of reward processes `reward.workers` means for reward `name`.

    Args:
        name (str): `reward.name`.
        workers (int | None): `reward.workers`; None = automatic.

    Returns:
        int: 0 = score in the calling process; >= 2 = that many worker processes (1 counts as 0).
            Automatic: `min(8, os.cpu_count())` for `math_verify` (0 on a one-core host), 0 for
            `exact_match`.
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if name == "math_verify" else 0
    return workers if workers >= 2 else 0


def _score_chunk(name: str, pairs: list[tuple[str, str]]) -> list[float]:
    """Worker side: the registered reward `name` over (response, answer) pairs, in order."""
    fn = REWARDS[name]
    return [float(fn(r, a)) for r, a in pairs]


class RewardScorer:
    """Scores a step's (response, answer) pairs with one reward function, pooled when asked.

    Args:
        name (str): `reward.name`; the pool looks the function up by this name in `REWARDS`.
        reward (Callable[[str, str], float]): the function itself (scored in-process when the pool is off).
        workers (int | None): `reward.workers` (`resolve_workers`).

    Attributes:
        workers (int): worker processes (0: in-process).
    """

    def __init__(self, name: str, reward: Callable[[str, str], float], workers: int | None = None):
        self.name, self.reward = name, reward
        self.workers = resolve_workers(name, workers) if REWARDS.get(name) is reward else 0
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Reward of each response against its answer, in order.

        Args:
            responses (Sequence[str]): decoded responses.
            answers (Sequence[str]): one reference answer per response.

        Returns:
            list[float]: `reward(responses[i], answers[i])` for each i, the values the serial loop gives.

        Raises:
            RewardPoolError: a worker died or the pool did not answer within
                `SECONDS_PER_SAMPLE x ceil(n / workers)` seconds (the pool is shut down).
            ValueError: responses and answers differ in length.
        """
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        pairs = list(zip(responses, answers, strict=True))
        if self.workers < 2 or len(pairs) < 2:
            return [float(self.reward(r, a)) for r, a in pairs]
        n = min(self.workers, len(pairs))
        size = math.ceil(len(pairs) / n)  # one contiguous chunk per worker: order kept by construction
        chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
        deadline = SECONDS_PER_SAMPLE * size + 60.0
        pool = self._get_pool()
        try:
            futures = [pool.submit(_score_chunk, self.name, c) for c in chunks]
            return [s for f in futures for s in f.result(timeout=deadline)]
        except BrokenProcessPool as e:
            self.close()
            raise RewardPoolError(f"reward.workers={self.workers}: a reward worker process died ({e}); "
                                  f"set reward.workers=0 to score {self.name} in the driver") from e
        except FuturesTimeout as e:
            self.close()
            raise RewardPoolError(f"reward.workers={self.workers}: {self.name} scoring of {len(pairs)} samples did "
                                  f"not finish in {deadline:.0f} s; set reward.workers=0 to score in the "
                                  "driver") from e

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (a later call starts a new pool).

        Returns:
            None
        """
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):  # a hung worker would block shutdown
                p.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
