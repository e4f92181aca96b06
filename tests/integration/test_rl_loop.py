"""The RL loop end to end on CPU: learning, exact resume after kill -9, overflow retries, audit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from nemo_rl_fp16.algorithms import policy_loss
from nemo_rl_fp16.assembly import build_run
from nemo_rl_fp16.commands.rl import audit, run
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.guards import NonFiniteError
from nemo_rl_fp16.precision import PrecisionMismatchError
from nemo_rl_fp16.trainer import RLTrainer

pytestmark = pytest.mark.integration

QUIET = Console(quiet=True)


def _cfg(tmp_path, *extra):
    return load_recipe("sanity_tiny", [
        f"output_dir={tmp_path}/run", f"warm_start.cache_dir={tmp_path.parent}/ws_cache",
        "logging.progress=false", "logging.tensorboard=false", *extra,
    ])


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_short_grpo_run_improves_reward(tmp_path):
    final = run(_cfg(tmp_path, "trainer.max_steps=15", "trainer.save_every=0", "trainer.export_hf=true"),
                console=QUIET)
    acc = [r["reward/accuracy"] for r in _rows(tmp_path / "run/metrics.jsonl")]
    assert len(acc) == 15
    assert sum(acc[-4:]) / 4 > sum(acc[:4]) / 4 + 0.1, acc
    for key in ("mismatch/kl_k3", "mismatch/kl_k1", "mismatch/abs_logratio_max", "mismatch/seq_logratio_std",
                "mismatch/is_ratio_max", "train/loss_scale", "train/grad_norm", "train/overflow_skips",
                "time/rollout_s", "loss/clip_fraction", "loss/value", "reward/mean"):
        assert key in final, key
    assert final["train/loss_scale"] == 65536.0
    rows = _rows(tmp_path / "run/metrics.jsonl")
    assert any(k.startswith("range/") or k.startswith("headroom/") for k in rows[0]), rows[0].keys()
    assert (tmp_path / "run/config.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step_000015"]
    # the HF export loads with plain transformers and holds the final master weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run/hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "run/hf").decode([5, 6]) == "12"
    last = load_file(tmp_path / "run/checkpoints/step_000015/model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in last.items())


def _strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "run/wall_s"} for r in rows]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    args = ["trainer.max_steps=6", "trainer.save_every=2", "data.prompts_per_step=4"]
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    common = [f"warm_start.cache_dir={tmp_path}/ws", "logging.progress=false", "logging.tensorboard=false", *args]
    cmd = [sys.executable, "-m", "nemo_rl_fp16.cli", "rl", "recipe=sanity_tiny", *common]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cmd, f"output_dir={ref_dir}"], check=True, capture_output=True, env=env, timeout=300)

    proc = subprocess.Popen([*cmd, f"output_dir={crash_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 240
    while not (crash_dir / "checkpoints" / "step_000002").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    crashed = _rows(crash_dir / "metrics.jsonl")
    assert len(crashed) < 6  # it really died mid-run
    r = subprocess.run([*cmd, f"output_dir={crash_dir}"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    ref, resumed = _rows(ref_dir / "metrics.jsonl"), _rows(crash_dir / "metrics.jsonl")
    assert [x["step"] for x in resumed] == list(range(1, 7))
    assert _strip_time(resumed) == _strip_time(ref)  # bitwise: floats compared exactly


@pytest.mark.parametrize("hysteresis", [1, 2])
def test_injected_inf_skips_backs_off_and_retries_same_batch(tmp_path, hysteresis):
    rc = typed(_cfg(tmp_path, "data.prompts_per_step=4", f"precision.loss_scale.hysteresis={hysteresis}"))
    setup = build_run(rc, console=QUIET)
    trainer = RLTrainer(rc, setup, QUIET)
    policy = setup.policy
    seen = []

    def plant_inf_once(grads):
        seen.append(policy.state_dict()["model"]["lm_head.weight"].clone())
        if len(seen) == 1:
            grads[0].view(-1)[0] = float("inf")

    policy.grad_hook = plant_inf_once
    calls = []
    inner = policy.train_step

    def spy(batch, loss_fn, temperature):
        calls.append(batch)
        return inner(batch, loss_fn, temperature)

    policy.train_step = spy
    before = {k: v.clone() for k, v in policy.state_dict()["model"].items()}
    m = trainer.step(0)
    assert len(calls) == 2 and calls[0] is calls[1]  # retried on the same rollout batch
    assert torch.equal(seen[0], seen[1])  # the overflowed attempt left the weights untouched
    assert m["train/overflow_skips"] == 1 and m["train/overflow_retries"] == 1
    # the retry ran at a strictly lower scale, also with hysteresis 2 (it used to retry at 65536 and overflow again)
    assert m["train/loss_scale"] == 32768.0
    after = policy.state_dict()["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the retry did train
    m2 = trainer.step(1)  # and training goes on
    assert m2["train/overflow_retries"] == 0 and m2["train/overflow_skips"] == 1


def test_persistent_overflow_stops_after_bounded_retries(tmp_path):
    rc = typed(_cfg(tmp_path, "data.prompts_per_step=4", "trainer.max_overflow_retries=2"))
    setup = build_run(rc, console=QUIET)
    trainer = RLTrainer(rc, setup, QUIET)
    calls = []
    setup.policy.grad_hook = lambda grads: (calls.append(1), grads[0].view(-1).__setitem__(0, float("nan")))
    before = {k: v.clone() for k, v in setup.policy.state_dict()["model"].items()}
    with pytest.raises(NonFiniteError, match=r"step 0: fp16 overflow persisted over 3 attempts"):
        trainer.step(0)
    assert len(calls) == 3 and trainer.state.skipped_updates == 2
    assert all(torch.equal(before[k], v) for k, v in setup.policy.state_dict()["model"].items())


def test_audit_refuses_planted_mismatch(tmp_path):
    rc = typed(_cfg(tmp_path, "data.prompts_per_step=4"))
    setup = build_run(rc, console=QUIET)
    audit(setup, rc)  # clean
    setup.rollout.model.model.layers[1].mlp.to(torch.bfloat16)
    with pytest.raises(PrecisionMismatchError, match=r"(?s)rollout engine .*layers\.1\.mlp\.gate_proj"):
        audit(setup, rc)


# Each variant: its overrides, the `policy_loss` keywords they mean, and the default keywords they replace (None:
# the variant changes no loss keyword). The loss itself is reference-tested in tests/unit/algorithms/test_losses.py;
# here the loop must hand the variant's keywords and the whole batch's normalisers to every micro-batch.
_LOSS_DEFAULTS = dict(correction="none", clip_low=0.2, clip_high=0.2, is_cap=2.0, reduction="token_mean",
                      kl_coef=0.0, kl_kind="k3")
VARIANTS = {
    "grpo_tis_bf16": (["algorithm.name=grpo", "algorithm.correction=tis", "precision=bf16"],
                      dict(name="grpo", correction="tis"), dict(correction="none")),
    "grpo_mis_seq_mean": (["algorithm.name=grpo", "algorithm.correction=mis", "algorithm.reduction=seq_mean_token_mean"],
                          dict(name="grpo", correction="mis", reduction="seq_mean_token_mean"),
                          dict(correction="none", reduction="token_mean")),
    # two updates per rollout: the clip only acts once the policy has moved away from the rollout's
    "gspo_clip": (["algorithm.name=gspo", "algorithm.clip_low=3e-4", "algorithm.clip_high=4e-4",
                   "algorithm.updates_per_rollout=2"],
                  dict(name="gspo", clip_low=3e-4, clip_high=4e-4), dict(clip_low=0.2, clip_high=0.2)),
    "pg_seq_is_mis_kl": (["algorithm.name=pg_seq_is", "algorithm.correction=mis", "algorithm.kl_coef=0.01"],
                         dict(name="pg_seq_is", correction="mis", kl_coef=0.01), dict(correction="none", kl_coef=0.0)),
    "bf16_rollout_two_updates": (["precision.rollout=bf16", "precision.allow_mismatch=true",
                                  "algorithm.updates_per_rollout=2"], dict(name="grpo"), None),
}


def _expected_loss(keywords, upd, logp, rows, global_counts=True):
    kw = {**_LOSS_DEFAULTS, **keywords}
    name = kw.pop("name")
    mask = upd["batch"].response_mask
    counts = {}
    if global_counts:  # the whole optimizer batch's normalisers, counted here from the mask
        counts = dict(global_valid_toks=float(mask.sum()), global_valid_seqs=float((mask.sum(-1) > 0).sum()))
    ref = upd["ref_logp"][rows] if kw["kl_coef"] > 0 else None
    loss, _ = policy_loss(name, logp, upd["old_logp"][rows], upd["batch"].rollout_logp[rows], upd["adv"][rows],
                          mask[rows], ref_logp=ref, **kw, **counts)
    return loss


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_algorithm_variants_run(tmp_path, variant, monkeypatch):
    """Each variant runs two steps without NaN, and every micro-batch loss the loop computed is the variant's
    `policy_loss` (not the default's) with whole-batch normalisers: the micro-batch losses of an update add up
    to the loss of the whole batch in one call, and the logged `loss/value` is that sum."""
    algo, keywords, default = VARIANTS[variant]
    updates, setups = [], []
    init, update = RLTrainer.__init__, RLTrainer.update

    def spy_init(self, cfg, setup, console=None):
        setups.append(setup)
        init(self, cfg, setup, console)

    def spy_update(self, batch, old_logp, ref_logp, adv):
        upd = {"batch": batch, "old_logp": old_logp, "ref_logp": ref_logp, "adv": adv, "attempts": []}
        updates.append(upd)
        train_step = self.policy.train_step

        def recording_train_step(b, loss_fn, temperature):
            calls = []
            upd["attempts"].append(calls)

            def recording_loss_fn(logp, rows):
                loss, metrics = loss_fn(logp, rows)
                calls.append((logp.detach().clone(), rows, loss.detach().clone()))
                return loss, metrics

            return train_step(b, recording_loss_fn, temperature)

        self.policy.train_step = recording_train_step
        try:
            return update(self, batch, old_logp, ref_logp, adv)
        finally:
            self.policy.train_step = train_step

    monkeypatch.setattr(RLTrainer, "__init__", spy_init)
    monkeypatch.setattr(RLTrainer, "update", spy_update)
    final = run(_cfg(tmp_path, "trainer.max_steps=2", "trainer.save_every=0", "data.prompts_per_step=4",
                     "policy.micro_batch_size=8", *algo), console=QUIET)
    assert all(v == v for v in final.values())  # no NaN anywhere
    # (pg_seq_is sums log-probs over tokens: its first fp16 steps may overflow at 2**16 and back off)
    assert final["train/overflow_retries"] <= 3 and final["loss/value"] == final["loss/value"]

    n_updates = 2 if "algorithm.updates_per_rollout=2" in algo else 1
    assert len(updates) == 2 * n_updates
    differs_from_default = False
    for upd in updates:
        n = upd["batch"].response_mask.shape[0]
        for calls in upd["attempts"]:
            assert [c[1] for c in calls] == [slice(i, min(i + 8, n)) for i in range(0, n, 8)]  # micro_batch_size=8
            for logp, rows, loss in calls:
                assert torch.equal(loss, _expected_loss(keywords, upd, logp, rows)), (variant, rows)
                if default is not None:
                    other = _expected_loss({**keywords, **default}, upd, logp, rows)
                    differs_from_default |= not torch.allclose(loss, other, rtol=1e-4, atol=0)
            whole = _expected_loss(keywords, upd, torch.cat([c[0] for c in calls]), slice(0, n), global_counts=False)
            assert float(sum(c[2] for c in calls)) == pytest.approx(float(whole), rel=1e-5, abs=1e-7)
    if default is not None:  # the variant's keywords changed the loss the loop optimised
        assert differs_from_default, f"{variant}: every loss equals the default's {default}"
    last = updates[-1]["attempts"][-1]
    assert final["loss/value"] == pytest.approx(float(sum(c[2] for c in last)), rel=1e-6, abs=1e-9)

    setup = setups[0]
    if "precision=bf16" in algo:  # bf16 end to end: no loss scaling
        assert setup.train_policy.param_dtype == setup.rollout_policy.param_dtype == torch.bfloat16
        assert not setup.train_policy.loss_scale.enabled and final["train/loss_scale"] == 1.0
    if "precision.rollout=bf16" in algo:  # the declared ablation: fp16 trainer, bf16 rollout engine
        assert setup.train_policy.param_dtype == torch.float16 and setup.rollout_policy.param_dtype == torch.bfloat16
    if n_updates == 2:  # the second update of a step starts from the moved policy: off-policy ratios
        for first, second in zip(updates[0::2], updates[1::2], strict=True):
            assert first["batch"] is second["batch"] and torch.equal(first["old_logp"], second["old_logp"])
            logp = torch.cat([c[0] for c in second["attempts"][-1]])
            m = second["batch"].response_mask.bool()
            assert (logp.float() - second["old_logp"].float())[m].abs().max() > 0


def test_bad_dataset_rows_give_one_line_error(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    r = subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", "rl", "recipe=sanity_tiny", "data.dataset=jsonl",
                        f"data.path={data}", f"output_dir={tmp_path}/o", "warm_start.enabled=false"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2  # refused by the validation stage, before any work
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.jsonl:2:" in lines[0] and "missing key 'answer'" in lines[0], r.stderr


def test_mismatch_command_writes_report(tmp_path):
    from nemo_rl_fp16.commands.mismatch import run_mismatch

    cfg = load_recipe("mismatch_tiny", [f"output_dir={tmp_path}/mm", "mismatch.num_prompts=8",
                                        "rollout.max_new_tokens=16", "logging.progress=false"])
    report = run_mismatch(cfg, console=QUIET)
    for f in ("report.md", "report.json", "kl_vs_length.png", "logratio_scatter.png", "seq_logratio_hist.png"):
        assert (tmp_path / "mm" / f).stat().st_size > 0
    kl = {p: report["runs"][p]["mismatch/kl_k3"] for p in ("fp32", "fp16", "bf16")}
    assert kl["fp32"] < kl["fp16"] < kl["bf16"], kl


def test_demo_runs_both_precisions_and_reports(tmp_path):
    from nemo_rl_fp16.commands.demo import run_demo

    code = run_demo([f"output_dir={tmp_path}/demo", f"warm_start.cache_dir={tmp_path}/ws", "trainer.max_steps=3",
                     "data.prompts_per_step=4", "logging.progress=false", "logging.tensorboard=false"],
                    recipe="sanity_tiny", console=QUIET)
    assert code == 0
    report = json.loads((tmp_path / "demo/report.json").read_text())
    assert set(report["runs"]) == {"fp16", "bf16"} and report["runs"]["fp16"]["steps"] == 3
    pooled = {}
    for p in ("fp16", "bf16"):
        rows = _rows(tmp_path / f"demo/{p}/metrics.jsonl")
        pooled[p] = sum(r["mismatch/kl_k3"] * r["mismatch/n_tokens"] for r in rows) / sum(r["mismatch/n_tokens"] for r in rows)
        assert report["runs"][p]["kl_k3_pooled"] == pytest.approx(pooled[p])
    assert report["kl_k3_pooled_bf16_over_fp16"] == pytest.approx(pooled["bf16"] / pooled["fp16"])
    assert report["numerics"]["kernels"] in ("package", "native") and report["numerics"]["torch"]
    assert "Pooled KL(µ‖π), bf16 vs fp16" in (tmp_path / "demo/report.md").read_text()
    assert (tmp_path / "demo/training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loop_logs_refit_bytes_and_mode(tmp_path):
    """Every step logs what its refit moved (`refit/bytes`, rollout dtype) and how (`refit/mode`)."""
    from nemo_rl_fp16.rollout.refit import MODE_CODES

    rc = typed(_cfg(tmp_path, "trainer.save_every=0", "data.prompts_per_step=4"))
    setup = build_run(rc, console=QUIET)
    weights = setup.rollout.model.state_dict().values()
    own_bytes = sum(v.numel() * v.element_size() for v in weights)  # the engine's weights in its own dtype
    assert {v.dtype for v in weights} == {setup.rollout.precision.param_dtype}
    trainer = RLTrainer(rc, setup)
    for step in range(2):
        metrics = trainer.step(step)
        assert metrics["refit/bytes"] == own_bytes
        assert metrics["refit/mode"] == MODE_CODES["direct"]  # the in-process torch engine
