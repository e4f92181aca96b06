"""GPU check (issue 17): fp16 Megatron distributed checkpoint save -> fresh process -> resume equality on CUDA.

The first process trains 2 steps, saves a step folder with `dist/` (megatron optimizer: fp32
main params, Adam moments, `DynamicGradScaler`), takes a 3rd step and records it; then it is
killed (`SIGKILL`). A second process builds the policy from other weights, loads the checkpoint
and takes the 3rd step: loss scale and log-probs must match. Prints one `GPU-RESULT` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve()


def test_fp16_megatron_save_kill_resume_on_cuda(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[2]), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, str(HERE), "save", str(tmp_path)], env=env)
    deadline = tmp_path / "after.pt"
    for _ in range(600):
        if deadline.exists() or first.poll() is not None:
            break
        import time
        time.sleep(0.5)
    if first.poll() is None:
        first.kill()  # SIGKILL: no clean shutdown
    assert deadline.exists(), "first process did not finish its 3 steps"
    second = subprocess.run([sys.executable, str(HERE), "resume", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    print(second.stdout[-2000:], second.stderr[-2000:])
    assert second.returncode == 0
    assert "GPU-RESULT" in second.stdout


def _main(mode: str, root: Path) -> None:  # pragma: no cover - subprocess on a GPU
    sys.path.insert(0, str(HERE.parent))
    from test_megatron_gpu import DENSE, _batch  # noqa: I001

    from nemo_rl_fp16 import checkpoint as ckpt
    from nemo_rl_fp16.runtime import capture_rng
    from nemo_rl_fp16.policy.megatron.policy import MegatronPolicy
    from nemo_rl_fp16.precision import PrecisionPolicy

    pol = PrecisionPolicy.from_name("fp16")
    b = _batch()
    adv = torch.randn(b.num_samples, generator=torch.Generator().manual_seed(1))
    mask = b.response_mask.float()

    def loss_fn(logp, rows):
        return -(logp * adv[rows, None].to(logp.device) * mask[rows].to(logp.device)).sum() / mask.sum(), {}

    from nemo_rl_fp16.modeling.hf import build_model

    seed = 0 if mode == "save" else 3
    sd = {k: v.detach().clone() for k, v in build_model(DENSE, torch.float32, seed=seed).state_dict().items()}
    tr = MegatronPolicy(DENSE, pol, lr=1e-4, micro_batch_size=4, initial_state_dict=sd, device="cuda")
    if mode == "save":
        for _ in range(2):
            tr.train_step(b, loss_fn, 1.0)
        ckpt.save_checkpoint(root / "ckpt", 2, model_state=None, sharded=lambda d: tr.save_sharded(d, 2),
                             trainer_state={}, rng=capture_rng(), data_state={"step": 2})
        r = tr.train_step(b, loss_fn, 1.0)
        torch.save({"scale": r.loss_scale, "grad_norm": r.grad_norm, "lp": tr.logprobs(b, 1.0).cpu()},
                   root / "after.tmp")
        os.replace(root / "after.tmp", root / "after.pt")
        import time
        time.sleep(600)  # killed here
    data = ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "ckpt"))
    tr.load_sharded(data["sharded_dir"])
    r = tr.train_step(b, loss_fn, 1.0)
    want = torch.load(root / "after.pt")
    err = (tr.logprobs(b, 1.0).cpu() - want["lp"]).abs().max().item()
    print(f"GPU-RESULT megatron fp16 dist-ckpt save->kill->resume: next-step loss scale {r.loss_scale:g} vs "
          f"{want['scale']:g}, grad norm {r.grad_norm:.6g} vs {want['grad_norm']:.6g}, log-prob max|diff| {err:.2e}",
          flush=True)
    assert r.loss_scale == want["scale"] and err == 0.0, err


if __name__ == "__main__":
    _main(sys.argv[1], Path(sys.argv[2]))
