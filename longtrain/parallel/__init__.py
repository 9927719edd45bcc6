"""Sequence parallelism: process groups, sequence sharding, Ulysses and ring attention.

The trainer calls three things (docs/internals.md, "Sequence parallel contract"):
``init_parallel_states`` (once, every ``sp_size`` of the run), ``shard_batch`` (every
micro-batch) and ``parallelize_attention`` (every stage start). See docs/sequence_parallel.md.
"""
from .comm import CommCounter, count_comm
from .hf_attention import ATTENTION_NAMES, check_sp_for_model, parallelize_attention
from .ring import ring_attention, ring_plan
from .sharding import (MODES, local_token_index, num_padding_tokens, pad_batch, padded_length,
                       shard_batch, shard_multiple)
from .state import ParallelState, check_sp_size, divisors, init_parallel_states
from .ulysses import check_ulysses_heads, kv_repeat, ulysses_attention, ulysses_degrees

__all__ = [
    "ATTENTION_NAMES", "CommCounter", "MODES", "ParallelState", "check_sp_for_model", "check_sp_size",
    "check_ulysses_heads", "count_comm", "divisors", "init_parallel_states", "kv_repeat",
    "local_token_index", "num_padding_tokens", "pad_batch", "padded_length", "parallelize_attention",
    "ring_attention", "ring_plan", "shard_batch", "shard_multiple", "ulysses_attention", "ulysses_degrees",
]
