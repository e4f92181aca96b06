"""The megatron backend's `micro_batches.ModelAdapter`: how `MicroBatchLoop` scores a micro-batch with megatron.

`MegatronPolicy` (`policy.py`) composes it with `MicroBatchLoop` (or the pipeline's `PipelineLoop`):
scoring through `MegatronCausalLM.response_logprobs` (vocab-parallel log-softmax over TP) under the
MoE routing in force (`expert_routing.ExpertRouting`: replay / recording), the package's CPU
numerics scope (`precision.cpu_numerics`), and megatron's data-parallel group.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from nemo_rl_fp16.interfaces import RolloutBatch
from nemo_rl_fp16.policy.expert_routing import ExpertRouting
from nemo_rl_fp16.policy.megatron.model import MegatronCausalLM
from nemo_rl_fp16.policy.megatron.parallel import data_parallel
from nemo_rl_fp16.policy.micro_batches import DataParallel
from nemo_rl_fp16.precision import PrecisionPolicy
from nemo_rl_fp16.precision.cpu_numerics import cpu_numerics

__all__ = ["MegatronModelAdapter"]


class MegatronModelAdapter:
    """`micro_batches.ModelAdapter` over a `MegatronCausalLM` (vocab-parallel scoring, megatron's DP group).

    Args:
        compute: the compute model.
        precision: the policy-side precision (`param_dtype` picks the numerics, `logits_dtype` the log-softmax).
        device: where the model runs.
        experts: the MoE routing of `compute` (`expert_routing.ExpertRouting`; replay, recording).
    """

    def __init__(self, compute: MegatronCausalLM, precision: PrecisionPolicy, device: torch.device,
                 experts: ExpertRouting):
        self.compute = compute
        self.precision = precision
        self.device = device
        self.experts = experts

    def score(self, mb: RolloutBatch, temperature: float) -> torch.Tensor:
        """`[n, T]` fp32 log π of the response tokens (`MegatronCausalLM.response_logprobs`), routed as `experts` says.

        Args:
            mb (RolloutBatch): `n` rows of `[P + T]` tokens.
            temperature (float): the sampling temperature T° (log-probs of `logits / T°`).

        Returns:
            torch.Tensor: `[n, T]` fp32 log π, gathered over TP (vocab-parallel log-softmax), 0 where masked.

        Raises:
            ValueError: replay is on and the batch carries no recorded experts (`ExpertRouting.replay_experts`).
        """
        with self.experts.replaying(mb):
            return self.compute.response_logprobs(mb.input_ids.to(self.device), mb.attention_mask.to(self.device),
                                                  mb.prompt_width, temperature, self.precision.logits_dtype)

    def numerics(self) -> AbstractContextManager:
        """`precision.cpu_numerics` for `param_dtype` on this device (a no-op on GPUs and for fp32).

        Returns:
            AbstractContextManager: the numerics scope of every forward/backward.
        """
        return cpu_numerics(self.device, self.precision.param_dtype)

    def data_parallel(self) -> DataParallel:
        """The data-parallel rank, size and group in megatron's parallel state (`parallel.data_parallel`).

        Returns:
            DataParallel: rank, size and process group of megatron's data-parallel group.
        """
        return data_parallel()
