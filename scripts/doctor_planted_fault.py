"""Run the mismatch doctor with a planted fault, to see how a fault reads in its report (docs/doctor.md).

    python scripts/doctor_planted_fault.py recipe=mismatch_tiny model.layers.1.input_layernorm.weight 1.01 \
        [precision=fp16,bf16] [key=value ...]

Scales one parameter of the torch rollout engine (HF name) by the given factor in every precision
but fp32 (the floor, the rounding reference), then writes the usual report under
`<output_dir>/doctor/` and prints, per precision, the first flagged point and its divergence over
its own rounding.
"""

from __future__ import annotations

import sys

from rich.console import Console


def main(argv: list[str]) -> int:
    from nemo_rl_fp16.config import ConfigError, load_recipe
    from nemo_rl_fp16.doctor_report import parse_precisions, run_doctor

    keys = [a for a in argv if "=" in a]
    rest = [a for a in argv if "=" not in a]
    if len(rest) != 2:
        print("usage: doctor_planted_fault.py recipe=NAME PARAM SCALE [precision=...] [key=value ...]", file=sys.stderr)
        return 2
    recipe = next((k.split("=", 1)[1] for k in keys if k.startswith("recipe=")), "mismatch_tiny")
    given = next((k.split("=", 1)[1] for k in keys if k.startswith("precision=")), None)
    overrides = [k for k in keys if not k.startswith(("recipe=", "precision="))]
    try:
        cfg = load_recipe(recipe, overrides)
        precisions = parse_precisions(given, ("fp16", "bf16"))
        report = run_doctor(cfg, precisions, Console(), plant=(rest[0], float(rest[1])))
    except (ConfigError, KeyError) as e:
        print(str(e).strip("'\""), file=sys.stderr)
        return 2
    for name, r in report["precisions"].items():
        first = next((x for x in r["layers"] if x["name"] == r["first_flagged"]), None)
        what = "" if first is None else f" ({first['rel_norm_u']:.2f} u" + (
            f", {first['ratio']:.2f}x own rounding)" if first.get("ratio") else ")")
        print(f"{name}: first flagged {r['first_flagged'] or 'none'}{what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
