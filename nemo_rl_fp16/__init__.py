"""FP16 end-to-end RL fine-tuning for LLMs: trainer and rollout engine in one precision.

See README.md, docs/ and arXiv 2510.26788 ("Defeating the Training-Inference Mismatch via FP16").
"""

__version__ = "0.1.0"
