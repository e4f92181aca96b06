"""Datasets (perfectible sanity tasks, JSONL math), prompt templates, rewards, SFT warm start.

The SFT code lives in `nemo_rl_fp16.warm_start` and is imported from there explicitly:
it is training machinery, not data loading.
"""

from nemo_rl_fp16.data.datasets import get_dataset
from nemo_rl_fp16.data.jsonl import TEMPLATES, DataError, load_jsonl, resolve_template
from nemo_rl_fp16.data.problem import Problem
from nemo_rl_fp16.data.rewards import REWARDS, exact_match, get_reward, math_verify_reward
from nemo_rl_fp16.data.sanity import DATASETS, make_sanity_dataset
from nemo_rl_fp16.data.tokenizer import build_char_tokenizer

__all__ = [
    "DATASETS",
    "REWARDS",
    "TEMPLATES",
    "DataError",
    "Problem",
    "build_char_tokenizer",
    "exact_match",
    "get_dataset",
    "get_reward",
    "load_jsonl",
    "make_sanity_dataset",
    "math_verify_reward",
    "resolve_template",
]
