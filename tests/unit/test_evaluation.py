"""Held-out evaluation (`trainer.eval_every`): disjoint problems, sampled by µ, eval/* in the run."""

from pathlib import Path

from nemo_rl_fp16.assembly import build_tokenizer
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.data import get_dataset, get_reward
from nemo_rl_fp16.evaluation import eval_problems, evaluate
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.rollout import build_rollout_engine


def test_generated_held_out_split_is_disjoint_and_sized():
    rc = typed(load_recipe("sanity_tiny", ["trainer.eval_every=5", "data.num_problems=64",
                                           "data.eval_num_problems=40"]))
    train = get_dataset(rc.data.model_dump(), seed=rc.seed)
    held = eval_problems(rc, train)
    assert len(held) == 40 and len(set(held)) == 40 and not set(held) & set(train)
    assert eval_problems(rc, train) == held  # deterministic
    assert eval_problems(typed(load_recipe("sanity_tiny")), train) == []  # eval_every=0: none


def test_eval_path_is_read_like_data_path(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+5=", "answer": "7"}\n')
    rc = typed(load_recipe("sanity_tiny", ["trainer.eval_every=1", f"data.eval_path={p}"]))
    assert [(q.prompt, q.answer) for q in eval_problems(rc, [])] == [("1+1=", "2"), ("2+5=", "7")]


def test_greedy_sampling_makes_pass_and_mean_equal_greedy_accuracy():
    """At temperature 0 every one of the k samples is the greedy answer: pass@k = mean@k = greedy accuracy.
    At temperature 1, pass@k >= mean@k (at least one of k vs the mean over k)."""
    rc = typed(load_recipe("sanity_tiny", ["warm_start.enabled=false", "trainer.eval_every=1"]))
    tok = build_tokenizer(rc)
    engine = build_rollout_engine(rc, PrecisionPolicy.from_name("fp32"), rc.model.model_dump(), tok, "cpu",
                                  initial_state_dict=None, model_dir=Path("unused"))
    problems = eval_problems(rc, get_dataset(rc.data.model_dump(), seed=rc.seed))[:8]
    prompts, answers = [tok(p.prompt)["input_ids"] for p in problems], [p.answer for p in problems]
    # a reward that some of an untrained model's answers earn: the first response character is a digit
    reward = get_reward("exact_match")
    lenient = lambda text, ans: float(bool(text) and text[0].isdigit())  # noqa: E731
    for r in (reward, lenient):
        sp = SamplingParams(max_new_tokens=3, temperature=0.0, stop_token_ids=(tok.eos_token_id,), seed=3)
        m = evaluate(engine, prompts, answers, sp, 3, tok, r)
        assert m["eval/pass@k"] == m["eval/mean@k"] == m["eval/accuracy_greedy"]
        assert m["eval/k"] == 3 and m["eval/num_problems"] == 8
    m = evaluate(engine, prompts, answers, SamplingParams(max_new_tokens=3, temperature=1.0, seed=3), 4, tok, lenient)
    assert 0 < m["eval/mean@k"] <= m["eval/pass@k"] <= 1


