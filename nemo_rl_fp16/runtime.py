"""Process-wide run settings: seeding (one seed mixer), RNG state capture/restore, the torch CPU thread count."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

#: Odd prime multiplier of `mix_seed`: (seed, k) pairs map to distinct streams for any k < 1_000_003.
SEED_MULTIPLIER = 1_000_003


def mix_seed(seed: int, k: int, modulus: int = 2**63 - 1) -> int:
    """A derived seed for stream `k` (a step, a request, an engine) of a run seeded `seed`.

    `(seed * 1_000_003 + k) % modulus`; vLLM needs `modulus=2**31`. The one seed mixer of the
    package: every derived seed goes through it, so streams never silently repeat.

    Args:
        seed: the run's seed (`seed` key).
        k: the stream index.
        modulus: the seed range of the consumer.

    Returns:
        The derived seed, in `[0, modulus)`.
    """
    return (seed * SEED_MULTIPLIER + k) % modulus


#: Stride between rollout engines' seeds (`engine_seed`): above any step count, and modulo 2**31 (vLLM's
#: seed range) an odd golden-ratio multiple (~0.618 * 2**31), so e * stride stays ~2**31 / e away from the
#: small step offsets there too.
ENGINE_SEED_STRIDE = 2**40 + 1_327_217_885


def engine_seed(step_seed: int, engine: int) -> int:
    """The sampling seed of rollout engine `engine` at a step.

    `step_seed` is the step's `mix_seed(seed, step)` (the trainer's); engine e samples with
    `mix_seed(seed, step + e * ENGINE_SEED_STRIDE)`, computed from the step seed as
    `step_seed + e * ENGINE_SEED_STRIDE`. Engine 0 keeps the step seed (a one-engine Ray run samples
    as the in-process engine does); every (step, engine) of a run with fewer than
    `ENGINE_SEED_STRIDE` steps gets its own seed. (Adding the engine index, as before, gave engine 1
    at step s the seed of engine 0 at step s + 1.)

    Args:
        step_seed: the step's sampling seed (`SamplingParams.seed`).
        engine: the engine's index among the run's rollout engines.

    Returns:
        The engine's seed, in `[0, 2**63 - 1)`.
    """
    return (step_seed + engine * ENGINE_SEED_STRIDE) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy's legacy global RNG and torch (CPU and CUDA) with `seed`.

    Args:
        seed: the run's seed (numpy gets `seed % 2**32`).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch ops on `n` CPU threads (None: leave torch's setting).

    The tiny sanity model is dominated by per-op overhead, and on a busy 2-core machine two
    OpenMP threads spin against other processes: measured 80 SFT steps in ~1.9 s on one thread
    vs 10-60 s on two.

    Args:
        n: threads inside the block, or None.

    Yields:
        Nothing; the previous thread count is restored on exit.
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)



def capture_rng() -> dict:
    """Python, numpy, torch CPU (and CUDA, when initialised) RNG states, weights_only-safe.

    Returns:
        {"python": [version, state list, gauss], "numpy": {"name", "keys" (int64 tensor), "pos",
        "has_gauss", "cached_gaussian"}, "torch": uint8 tensor, "cuda": [uint8 tensor per device]
        (only when CUDA is initialised)}; pass it to `restore_rng`.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Inverse of `capture_rng`; CUDA states are restored only when the device count matches.

    Args:
        state: a dict from `capture_rng` (as loaded back by `load_checkpoint`).
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
