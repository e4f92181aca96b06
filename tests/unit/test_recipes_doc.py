"""docs/recipes.md lists every packaged recipe and its keys table matches base.yaml's comments."""

import importlib.util
import re
from pathlib import Path

from nemo_rl_fp16.config import available_recipes, load_recipe

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "recipes.md").read_text()


def _gen():
    spec = importlib.util.spec_from_file_location("gen_recipes_doc", ROOT / "scripts" / "gen_recipes_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_packaged_recipe_is_listed_once():
    listed = re.findall(r"^\| `([a-z0-9_]+)` \|", DOC.split("## Keys reference")[0], flags=re.M)
    assert sorted(listed) == sorted(available_recipes())


def test_keys_reference_is_generated_from_base_yaml():
    gen = _gen()
    assert gen.render(DOC, gen.BASE.read_text()) == DOC, "run: python scripts/gen_recipes_doc.py"


def test_keys_reference_covers_every_leaf_key():
    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    from omegaconf import OmegaConf

    keys = set(re.findall(r"^\| `([\w.]+)` \|", DOC.split("## Keys reference")[1], flags=re.M))
    base = OmegaConf.to_container(load_recipe("base"), resolve=False)
    missing = [k for k in leaves(base) if k not in keys]
    assert not missing, missing
