"""The embedded demo: a small Llama-family model, generated arithmetic data, dense vs sparse.

``sparselora-fx demo`` runs ``run_demo(DemoConfig())``; see ``runner`` for what it measures.
"""

from __future__ import annotations

from .data import CharTokenizer, encode_example, generate_problems, load_alpaca_json
from .runner import DemoConfig, demo_policy, results_table, run_demo

__all__ = [
    "CharTokenizer",
    "DemoConfig",
    "demo_policy",
    "encode_example",
    "generate_problems",
    "load_alpaca_json",
    "results_table",
    "run_demo",
]
