"""Audit of a live model against a `PrecisionPolicy`: every parameter and floating buffer."""

from __future__ import annotations

import torch

from nemo_rl_fp16.precision.policy import ROUTER_COMPONENTS, PrecisionMismatchError, PrecisionPolicy, dtype_name


def is_router_param(name: str) -> bool:
    """True for MoE router / gate weights (by module-path component, not substring).

    Args:
        name: a parameter name, e.g. "model.layers.0.mlp.gate.weight".

    Returns:
        Whether a module component of `name` (the leaf excluded) is in `ROUTER_COMPONENTS`.
    """
    return any(part in ROUTER_COMPONENTS for part in name.split(".")[:-1])


def audit_model(model: torch.nn.Module, policy: PrecisionPolicy) -> list[str]:
    """Every parameter / floating buffer group whose dtype breaks `policy`, one line each.

    Parameters under an MoE router/gate are checked against `router_dtype`, all others against
    `param_dtype`. Floating buffers (rotary tables and the like) may be `param_dtype` or fp32.
    Offending tensors are grouped by owning module and found dtype; when every parameter of a
    role is off in the same way the group collapses to one `<all ...>` line.

    Args:
        model: the live model of an engine.
        policy: the `PrecisionPolicy` it must follow.

    Returns:
        Lines "<module>.<leaf or {leaves}>: found <dtype>, expected <dtype> (<role>)"; empty =
        clean.
    """
    groups: dict[tuple[str, str, torch.dtype, torch.dtype], list[str]] = {}
    role_counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        role = "router_dtype" if is_router_param(name) else "param_dtype"
        role_counts[role] = role_counts.get(role, 0) + 1
        expected = getattr(policy, role)
        if p.dtype != expected:
            module, _, leaf = name.rpartition(".")
            groups.setdefault((role, module or "<root>", p.dtype, expected), []).append(leaf)
    for name, b in model.named_buffers():
        if b.is_floating_point() and b.dtype not in (policy.param_dtype, torch.float32):
            module, _, leaf = name.rpartition(".")
            groups.setdefault(("buffer", module or "<root>", b.dtype, policy.param_dtype), []).append(leaf)

    lines = []
    for role in ("param_dtype", "router_dtype"):
        role_groups = {k: v for k, v in groups.items() if k[0] == role}
        found = {k[2] for k in role_groups}
        n_bad = sum(len(v) for v in role_groups.values())
        if len(found) == 1 and n_bad == role_counts.get(role, 0) and len(role_groups) > 1:
            what = "parameters" if role == "param_dtype" else "router/gate parameters"
            lines.append(
                f"<all {n_bad} {what}>: found {dtype_name(found.pop())}, "
                f"expected {dtype_name(getattr(policy, role))} ({role})"
            )
            groups = {k: v for k, v in groups.items() if k[0] != role}
    for (role, module, found_dt, expected), leaves in groups.items():
        what = f"{module}.{{{','.join(leaves)}}}" if len(leaves) > 1 else f"{module}.{leaves[0]}"
        label = "buffer, expected param_dtype or float32" if role == "buffer" else role
        lines.append(f"{what}: found {dtype_name(found_dt)}, expected {dtype_name(expected)} ({label})")
    return lines


def check_model(model: torch.nn.Module, policy: PrecisionPolicy, component: str) -> None:
    """`audit_model`, raising on any finding.

    Args:
        model: the live model of an engine.
        policy: the `PrecisionPolicy` it must follow.
        component: what the model is ("trainer compute model", "rollout engine", ...), for the
            message.

    Raises:
        PrecisionMismatchError: `audit_model` found a tensor in the wrong dtype (lists them all).
    """
    problems = audit_model(model, policy)
    if problems:
        raise PrecisionMismatchError(component, problems)
