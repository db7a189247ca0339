"""Glue for the trainers people already use (Hugging Face Trainer / TRL); see docs/integrations.md.

Submodules import their framework lazily, so ``import sparselora_fx`` never needs transformers.
"""
