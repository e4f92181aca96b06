"""SFT warm start: teach a tiny model the sanity task *partially* before RL.

RL can only sharpen behaviour the policy already samples sometimes (the paper's "perfectible"
premise), so the warm start stops early on purpose: the model solves the training problems with
non-zero but imperfect probability, leaving RL the room to reach ~100%. The result is cached
on disk keyed by everything that determines it, so the fp16 and bf16 runs of a demo (and reruns)
start from bit-identical weights without paying for SFT twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from nemo_rl_fp16.data.problem import Problem
from nemo_rl_fp16.data.rewards import exact_match
from nemo_rl_fp16.fsutil import atomic_write
from nemo_rl_fp16.runtime import torch_threads

CACHE_VERSION = 1
# Measured on 2 shared CPU cores (1 torch thread), sanity_add, 64 problems, tiny_qwen2_config(32),
# seeds 0/1/1234: 70 steps take ~1.5 s and leave 43-60% sampled accuracy at temperature 1
# (32 samples/problem; 0-1 of 64 problems never solved); 80 steps 59-71%, 150 steps ~91%.
DEFAULT_STEPS = 70
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 32


def tiny_qwen2_config(vocab_size: int, **overrides):
    """The tiny Qwen2 used by the CPU sanity recipes (head_dim 32, untied embeddings).

    2 layers, hidden 128, MLP 256, 4 query / 2 KV heads, 64 positions.

    Args:
        vocab_size: the tokenizer's vocabulary size.
        **overrides: any other `Qwen2Config` field, replacing the defaults above.

    Returns:
        A `transformers.Qwen2Config`.
    """
    from transformers import Qwen2Config

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return Qwen2Config(**kw)


def _encode(tokenizer, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded `<bos>prompt answer <eos>` ids, attention mask and answer-only labels."""
    rows, labels = [], []
    for p in problems:
        prompt = tokenizer(p.prompt)["input_ids"]
        answer = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, width - len(r) :] = torch.tensor(r)
        lab[i, width - len(r) :] = torch.tensor(lb)
        mask[i, width - len(r) :] = 1
    return ids, mask, lab


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Same convention as the engines (interfaces.py): left padding positioned as if unpadded."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _tensor_digest(h, state: dict[str, torch.Tensor]) -> None:
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())


def cache_key(model, tokenizer, problems, steps, lr, batch_size, seed) -> str:
    """sha256 of everything that determines the warm-started weights (incl. the initial ones).

    Args:
        model: the HF causal LM before training (its config, minus `transformers_version`, and
            every tensor of its state dict are hashed).
        tokenizer: its vocabulary is hashed.
        problems: the SFT problems (prompt, answer), in order.
        steps: SFT steps.
        lr: peak learning rate.
        batch_size: problems per step.
        seed: the batch-sampling seed.

    Returns:
        The hex digest; also the cache entry's folder name.
    """
    cfg = model.config.to_dict()
    cfg.pop("transformers_version", None)
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "config": cfg,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "problems": [[p.prompt, p.answer] for p in problems],
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
        },
        sort_keys=True,
        default=str,
    )
    h = hashlib.sha256(blob.encode())
    _tensor_digest(h, model.state_dict())
    return h.hexdigest()


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    _tensor_digest(h, state)
    return h.hexdigest()


def _load_cached(path: Path, model) -> dict[str, torch.Tensor]:
    """Read a cache entry and check it fully *before* touching the model (no partial loads)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        expected = (f.metadata() or {}).get("sha256")
    state = load_file(str(path))
    if expected != _state_digest(state):
        raise ValueError("tensor checksum mismatch")
    ref = model.state_dict()
    bad = sorted(set(ref) ^ set(state)) + [k for k in ref if k in state and state[k].shape != ref[k].shape]
    if bad:
        raise ValueError(f"tensors do not match the model: {bad[:3]}")
    return state


def _fp32_state(model) -> dict[str, torch.Tensor]:
    """Detached fp32 copies (fresh storage each, so safetensors never sees shared tensors)."""
    return {k: v.detach().to(torch.float32).cpu().clone() for k, v in model.state_dict().items()}


def _train(model, tokenizer, problems, steps, lr, batch_size, seed, progress) -> None:
    """Teacher-forced SFT with loss on answer tokens only; fp32, AdamW, grad clip 1.0."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    ids, mask, labels = _encode(tokenizer, problems)
    pos = _positions(mask)
    gen = torch.Generator().manual_seed(seed)
    model.to(torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    cols = (
        TextColumn("warm start"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*cols, disable=not progress, transient=True) as bar:
        task = bar.add_task("sft", total=steps, loss="-")
        for step in range(steps):
            idx = torch.randint(len(problems), (min(batch_size, len(problems)),), generator=gen)
            out = model(input_ids=ids[idx], attention_mask=mask[idx], position_ids=pos[idx], labels=labels[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 10 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, loss=f"{out.loss.item():.3f}")
    model.eval()


def warm_start(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_threads: int | None = 1,
) -> dict[str, torch.Tensor]:
    """SFT `model` in place on `problems` and return its fp32 state dict.

    Teacher-forced SFT on the answer tokens (`<bos>prompt answer<eos>`, loss on answer + EOS only),
    fp32, AdamW (betas 0.9/0.98, no weight decay), linear warm-up over steps // 20, gradient
    clipping at 1.0. With `cache_dir`, the result is stored at
    `<cache_dir>/<key>/model.safetensors` (see `cache_key`, sha256-checked on load) and reused when
    present; an unreadable cache entry is warned about and rebuilt. Build `model` under a fixed
    torch seed: its initial weights are part of the key.

    Args:
        model: an HF causal LM; trained (or loaded from the cache) in place, left fp32 in eval mode.
        tokenizer: its tokenizer (needs `pad_token_id` and `eos_token_id`).
        problems: the problems to teach.
        steps: SFT steps (default 70: leaves ~43-60% sampled accuracy on sanity_add, see
            `DEFAULT_STEPS`).
        lr: peak learning rate.
        batch_size: problems sampled (with replacement) per step.
        seed: seeds the batch sampling.
        cache_dir: the warm-start cache folder (None: no cache).
        progress: show a transient rich progress bar.
        num_threads: torch threads during training only (see `runtime.torch_threads`).

    Returns:
        name -> fp32 CPU tensor (fresh storage each), the warm-started weights.

    Raises:
        ValueError: `problems` is empty.
    """
    if not problems:
        raise ValueError("warm_start: no problems to train on")
    path = None
    if cache_dir is not None:
        key = cache_key(model, tokenizer, problems, steps, lr, batch_size, seed)
        path = Path(cache_dir) / key / "model.safetensors"
        if path.exists():
            try:
                state = _load_cached(path, model)
                model.load_state_dict(state, strict=True)
                model.to(torch.float32).eval()
                return _fp32_state(model)
            except Exception as e:  # corrupt/truncated/foreign file: rebuild rather than crash
                warnings.warn(
                    f"warm-start cache {path} is unreadable ({type(e).__name__}: {e}); retraining", stacklevel=2
                )
    with torch_threads(num_threads):
        _train(model, tokenizer, problems, steps, lr, batch_size, seed, progress)
    state = _fp32_state(model)
    if path is not None:
        atomic_write(path, save(state, metadata={"sha256": _state_digest(state)}))
    return state


@torch.no_grad()
def sample_responses(
    model, tokenizer, prompts: Sequence[str], num_samples: int, temperature: float, max_new_tokens: int, seed: int
) -> list[list[str]]:
    """`num_samples` decoded responses per prompt (text before EOS); batched, no KV cache.

    Evaluation only: the RL rollouts use the engines in `rollout/`. The model's train/eval mode is
    restored afterwards.

    Args:
        model: an HF causal LM (any dtype; logits are taken in fp32).
        tokenizer: its tokenizer (left padding, `pad_token_id`, `eos_token_id`).
        prompts: prompt texts.
        num_samples: responses per prompt.
        temperature: sampling temperature; 0 = greedy.
        max_new_tokens: response length cap (tokens).
        seed: seeds the sampler's `torch.Generator`.

    Returns:
        `len(prompts)` lists of `num_samples` response texts (special tokens skipped).
    """
    was_training = model.training
    model.eval()
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt", padding_side="left")
    ids = enc["input_ids"].repeat_interleave(num_samples, 0)
    mask = enc["attention_mask"].repeat_interleave(num_samples, 0)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done |= nxt == tokenizer.eos_token_id
        if bool(done.all()):
            break
    model.train(was_training)
    resp = torch.stack(out, 1).cpu().tolist() if out else [[] for _ in range(ids.shape[0])]
    texts = []
    for row in resp:
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def per_problem_accuracy(
    model, tokenizer, problems, num_samples=8, temperature=1.0, max_new_tokens=8, seed=0, chunk=256
) -> list[float]:
    """Fraction of sampled responses that exactly match each problem's answer.

    Use it to filter a perfectible set (keep problems with accuracy > 0) as the paper does
    (arXiv 2510.26788). Problems are sampled in chunks, chunk starting at s seeded `seed + s`.

    Args:
        model: an HF causal LM.
        tokenizer: its tokenizer.
        problems: the problems to score.
        num_samples: responses per problem.
        temperature: sampling temperature (0 = greedy).
        max_new_tokens: response length cap.
        seed: base sampling seed.
        chunk: problems per batched `sample_responses` call.

    Returns:
        Per problem, in order, the share of its `num_samples` responses scoring 1 under
        `exact_match` (0.0 .. 1.0).
    """
    acc = []
    for s in range(0, len(problems), chunk):
        part = problems[s : s + chunk]
        resp = sample_responses(
            model, tokenizer, [p.prompt for p in part], num_samples, temperature, max_new_tokens, seed + s
        )
        acc += [sum(exact_match(r, p.answer) for r in rs) / num_samples for p, rs in zip(part, resp, strict=True)]
    return acc


def sampled_accuracy(model, tokenizer, problems, num_samples=8, temperature=1.0, max_new_tokens=8, seed=0) -> float:
    """Mean sampled accuracy over `problems` (what RL's training accuracy starts from).

    Args:
        model: an HF causal LM.
        tokenizer: its tokenizer.
        problems: the problems to score (non-empty: an empty list divides by zero).
        num_samples: responses per problem.
        temperature: sampling temperature (0 = greedy).
        max_new_tokens: response length cap.
        seed: base sampling seed (see `per_problem_accuracy`).

    Returns:
        The mean of `per_problem_accuracy`, in [0, 1].
    """
    acc = per_problem_accuracy(model, tokenizer, problems, num_samples, temperature, max_new_tokens, seed)
    return sum(acc) / len(acc)
