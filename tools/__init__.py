"""
Benchmarks and figures for amlm, run from the repository root: `python -m tools.bench ...`, `python -m tools.plot ...`.
"""
