"""Benchmark parsers, data preparation, synthetic pedestrians and loaders.

Kept import-light (no torch) so `python -m datasets.prepare` and `datasets.synthetic.generate` start fast.
"""
from datasets import cuhkpedes, icfgpedes, rstpreid

PARSERS = {m.BENCHMARK.name: m.parse for m in (cuhkpedes, icfgpedes, rstpreid)}
BENCHMARKS = {m.BENCHMARK.name: m.BENCHMARK for m in (cuhkpedes, icfgpedes, rstpreid)}
