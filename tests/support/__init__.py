"""Helpers shared by the test suite (and the long-context study's subprocess environment).

- ``paths``: the repository root and the real data of ``../shared/data`` (skip when absent);
- ``env``: the environment of every subprocess a test or the study starts, free ports;
- ``runs``: write run configs, launch real training runs (subprocesses, gloo on 127.0.0.1), read
  their metrics and sample logs;
- ``distributed``: run a function on N gloo ranks and collect the results;
- ``models``: the one tiny HF model family (Llama, Qwen2, Mistral) every test builds from;
- ``text``: real text and tokenizers trained in-test (standard library sources, WikiText rows);
- ``dataset_checks``: readers and invariant checks of prepared datasets.
"""
