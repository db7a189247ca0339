"""Research studies that use the sparselora_fx library, not part of it: the estimator fidelity
study (`studies.fidelity`: how well each channel-ranking rule matches the oracle on real weights
and text), the fine-tuning accuracy study (`studies.accuracy`: dense LoRA vs SparseLoRA, trained
sparse and evaluated dense) and its stdlib-docstring corpus (`studies.docstring_corpus`). They
import the library like any user would; the library never imports them, and they are not
installed with it (run them from a checkout: benchmarks/fidelity.py, benchmarks/accuracy.py).
"""
