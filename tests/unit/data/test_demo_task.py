"""The demo's task: long, checkable, and perfectible after the recipe's warm start."""

import statistics

from rich.console import Console

from nemo_rl_fp16.assembly import build_tokenizer, initial_weights
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.data import get_dataset
from nemo_rl_fp16.data.sanity import addition_steps, make_add_steps
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.rollout.torch_engine import TorchRolloutEngine


def test_written_out_addition_is_right_and_long():
    assert addition_steps(4738, 2595) == "8+5=13 3+9+1=13 7+5+1=13 4+2+1=7 7333"
    assert addition_steps(1000, 1000) == "0+0=0 0+0=0 0+0=0 1+1=2 2000"
    problems = make_add_steps(500, seed=3)
    assert len({p.prompt for p in problems}) == 500 and problems == make_add_steps(500, seed=3)
    for p in problems:
        a, b = (int(x) for x in p.prompt.rstrip("=").split("+"))
        assert p.answer.split()[-1] == str(a + b)
        carry = 0
        for (x, y), step in zip(zip(str(a)[::-1], str(b)[::-1], strict=True), p.answer.split()[:-1], strict=True):
            terms, total = step.split("=")
            assert terms == f"{x}+{y}" + ("+1" if carry else "") and int(total) == int(x) + int(y) + carry
            carry = int(total) // 10
    # +1 for the EOS token the response ends with
    assert statistics.mean(len(p.answer) + 1 for p in problems) >= 32


def test_demo_task_is_perfectible_after_the_warm_start(tmp_path):
    """Every demo problem is solved at least once in 64 samples at temperature 1 (the paper's
    perfectible set: RL can reach ~100% without the model learning anything new)."""
    rc = typed(load_recipe("demo_tiny", [f"warm_start.cache_dir={tmp_path}", "logging.progress=false"]))
    tok = build_tokenizer(rc)
    problems = get_dataset(rc.data.model_dump(), seed=rc.seed)
    init = initial_weights(rc, tok, problems, Console(quiet=True))
    engine = TorchRolloutEngine(rc.model.model_dump(), PrecisionPolicy.from_name("fp32"), pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id, initial_state_dict=init, max_batch_size=1024)
    n = 64
    batch = engine.generate([tok(p.prompt)["input_ids"] for p in problems],
                            SamplingParams(max_new_tokens=rc.rollout.max_new_tokens, num_generations=n, seed=1))
    texts = tok.batch_decode(batch.responses.masked_fill(batch.response_mask == 0, tok.pad_token_id),
                             skip_special_tokens=True)
    acc = [sum(texts[i * n + j].strip() == p.answer for j in range(n)) / n for i, p in enumerate(problems)]
    assert min(acc) > 0, sorted(acc)[:5]
    assert statistics.mean(acc) < 0.99, "nothing left for RL to learn"
    assert batch.response_mask.sum(-1).float().mean() >= 32
    assert len(problems) == rc.data.num_problems
