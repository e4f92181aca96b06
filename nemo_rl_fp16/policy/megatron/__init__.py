"""The megatron-core policy backend (`policy.backend=megatron`), split by job.

- `parallel`: torch.distributed + megatron's TP/PP/EP groups and RNG (`init_megatron_parallel`), the DP group.
- `attention`: the core-attention choice (`resolve_attention`: TE, torch SDPA, megatron's local).
- `model`: `transformer_config`, `layer_spec`, `build_gpt_model`, and `MegatronCausalLM`, the
  HF-call-compatible wrapper (row rotation for HF positions, vocab-parallel log-probs).
- `convert`: HF <-> megatron weight names and layouts (pure functions) and the HF weight source.
- `sharding`: TP/EP split and merge, `shard_state_dict`, `load_shard_`, `gather_full_state_dict`.
- `cpu_rehearsal`: megatron-core's CUDA calls redirected to the CPU (rehearsals, tests).
- `policy`: `MegatronPolicy`, the `PolicyEngine` (composes `policy.micro_batches` and, on CPU,
  `policy.mixed_precision`).

Nothing here imports megatron-core at module level; import `policy.megatron.policy` for the engine.
"""
