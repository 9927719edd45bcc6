"""Long-context evaluation: perplexity by position, passkey retrieval, plots (docs/evaluation.md).

Modules: ``data`` (held-out documents), ``tokenizer``, ``loading`` (models, fresh RoPE state),
``perplexity``, ``passkey``, ``plots``, ``report``, ``runner`` (``run_eval``, ``EvalConfig``).
"""
