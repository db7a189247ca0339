"""Analysis (compile time): match frozen linear + LoRA units, then prove their dataflow groups.

``units`` finds every frozen linear whose output meets a LoRA branch; ``groups`` proves MLP
groups; ``attention`` proves attention Q/K and V/O groups (RoPE, GQA). Nothing here changes a graph.
"""
