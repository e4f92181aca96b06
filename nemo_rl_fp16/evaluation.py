"""Held-out evaluation (`trainer.eval_every`): problems the run never trains on, sampled by µ.

Problems: `data.eval_path` (a JSONL file read like `data.path`: same keys and template) or, for a
generated dataset, `data.eval_num_problems` problems of the same generator that are *disjoint*
from the training set (drawn with another seed, training problems removed).

Metrics (the usual definitions, e.g. Chen et al. 2021 for pass@k with n = k samples):

- `eval/accuracy_greedy`: fraction of problems whose greedy (temperature 0) answer is correct;
- `eval/pass@k`: fraction of problems with at least one correct answer among `trainer.eval_k`
  samples at `rollout.temperature` / `rollout.top_p`;
- `eval/mean@k`: mean correctness over those k samples (= expected accuracy of one sample);
- `eval/k`, `eval/num_problems`: the settings the numbers were computed with.

Correct = reward > 0.5, as `reward/accuracy` in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from nemo_rl_fp16.config import RecipeConfig
from nemo_rl_fp16.data import Problem, get_dataset
from nemo_rl_fp16.interfaces import RolloutBatch, RolloutEngine, SamplingParams

_EVAL_SEED_SALT = 1_000_003  # the held-out draw's seed: seed + salt (any value other than the training seed)


def eval_problems(rc: RecipeConfig, train: list[Problem]) -> list[Problem]:
    """The held-out problems of a run (see module doc); empty when `trainer.eval_every` is 0.

    Args:
        rc (RecipeConfig): the typed recipe (`trainer.eval_every`, `data.*`, `seed`).
        train (list[Problem]): the run's training problems (never part of the held-out set).

    Returns:
        list[Problem]: `data.eval_path`'s problems, else up to `data.eval_num_problems` generated
            problems not in `train`; empty when `trainer.eval_every` is 0.

    Raises:
        ValueError: the generator cannot supply `eval_num_problems` problems besides the training ones.
        DataError: `data.eval_path` is unreadable or malformed (from `load_jsonl`).
    """
    if not rc.trainer.eval_every:
        return []
    d = rc.data
    if d.eval_path:
        return get_dataset({**d.model_dump(), "dataset": "jsonl", "path": d.eval_path}, seed=rc.seed)
    seen = set(train)
    want = d.num_problems + d.eval_num_problems  # at most num_problems of the draw are training problems
    candidates = get_dataset({**d.model_dump(), "num_problems": want}, seed=rc.seed + _EVAL_SEED_SALT)
    return [p for p in candidates if p not in seen][: d.eval_num_problems]


def correct(engine_batch: RolloutBatch, answers: list[str], group: int, tokenizer,
            reward: Callable[[str, str], float]) -> torch.Tensor:
    """`[N]` bool: sample i's decoded response (up to EOS) earns reward > 0.5 against answer i // group.

    Args:
        engine_batch (RolloutBatch): `N` sampled rows (`responses`, `response_mask`).
        answers (list[str]): one reference answer per prompt.
        group (int): samples per prompt (row i answers prompt `i // group`).
        tokenizer: decodes the response tokens (EOS dropped, special tokens skipped).
        reward (Callable[[str, str], float]): (response text, answer) -> reward.

    Returns:
        torch.Tensor: `[N]` bool, True where the reward is above 0.5.
    """
    out = []
    rows = zip(engine_batch.responses.tolist(), engine_batch.response_mask.tolist(), strict=True)
    for i, (ids, m) in enumerate(rows):
        tokens = [t for t, keep in zip(ids, m, strict=True) if keep and t != tokenizer.eos_token_id]
        out.append(reward(tokenizer.decode(tokens, skip_special_tokens=True), answers[i // group]) > 0.5)
    return torch.tensor(out, dtype=torch.bool)


def evaluate(rollout: RolloutEngine, prompts: list[list[int]], answers: list[str], sampling: SamplingParams,
             k: int, tokenizer, reward: Callable[[str, str], float]) -> dict[str, float]:
    """Greedy accuracy, pass@k and mean@k of `rollout` on held-out prompts (module doc).

    Args:
        rollout: the run's rollout engine (µ), current weights.
        prompts: token ids of each held-out prompt.
        answers: each prompt's reference answer.
        sampling: the run's sampling settings (temperature, top_p, max_new_tokens, stop tokens, seed).
        k: samples per problem for pass@k / mean@k.
        tokenizer: the run's tokenizer (decodes responses up to EOS).
        reward: the run's reward function (response text, answer) -> reward; correct = reward > 0.5.

    Returns:
        dict[str, float]: `eval/accuracy_greedy`, `eval/pass@k`, `eval/mean@k` (fractions in
            [0, 1]), `eval/k` and `eval/num_problems`.
    """
    n = len(prompts)
    greedy = rollout.generate(prompts, dataclasses.replace(sampling, temperature=0.0, num_generations=1))
    ok_greedy = correct(greedy, answers, 1, tokenizer, reward)
    sampled = rollout.generate(prompts, dataclasses.replace(sampling, num_generations=k))
    ok = correct(sampled, answers, k, tokenizer, reward).view(n, k).float()
    return {
        "eval/accuracy_greedy": ok_greedy.float().mean().item(),
        "eval/pass@k": (ok.max(dim=1).values).mean().item(),
        "eval/mean@k": ok.mean().item(),
        "eval/k": float(k),
        "eval/num_problems": float(n),
    }
