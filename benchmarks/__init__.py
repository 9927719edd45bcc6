"""Benchmarks and studies of longtrain, run from the repository root.

The ``bench_*.py`` scripts print ratios against a baseline measured in the same run
(``python benchmarks/bench_train.py``); ``study`` is the long-context study
(``python -m benchmarks.study``, docs/long_context_study.md). This file makes ``benchmarks`` a
package so that the study's modules import each other, and the tests import them, by name.
"""
