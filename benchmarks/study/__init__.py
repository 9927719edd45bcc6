"""The long-context study of issue 6 (docs/long_context_study.md): ``python -m benchmarks.study``.

Does the staged RoPE recipe work? A ~1.1M-parameter Llama is trained from scratch at L = 128 with
base 10k, then extended with equal steps and tokens by several methods; held-out perplexity by
position shows what each method does within L and beyond it. One module per job:

- ``corpus``: the train / held-out split of the shared corpora and the standard library;
- ``recipe``: configs/study (recipe.yaml, methods.yaml) -> the runs and their ``--set`` overrides;
- ``runner``: ``longtrain`` subprocesses (skipped when done), data prep, base and method training;
- ``variants``: training-free RoPE variants of the exported base, written as model folders;
- ``evaluation``: ``longtrain export`` and the ``longtrain eval`` calls;
- ``analysis``: perplexity over position ranges, seed means and spreads, goal checks;
- ``plots`` and ``report``: the figures, ``report.md`` and ``study_results.json``;
- ``cli``: the command line (``__main__`` runs it).
"""
