"""Reading core-experiment results (``docs/core-exp-format.md``) into Polars frames.

``load_results`` returns a :class:`LoadResult` with two frames:

samples — one row per usable sample:
    sample_key (Int64, unique within one load), dataset (Str, underscores), file (Str),
    sample_id (Int64), tier (Str), tier_idx (Int64), top_k (Int64),
    num_active_blocks (Int64), config (Str, ``<tier>_<top_k>_<blocks>``),
    output_tokens (Int64), n_decode_passes (Int64), actual_num_crops (Int64),
    vision_tokens (Int64), text_tokens (Int64), total_sequence_length (Int64),
    T_vision_total, T_LLM_prefill, T_LLM_decode, T_total, T_decode_per_token,
    T_prefill_total (Float64, milliseconds), num_total_blocks (Int64, the profiled model's
    blocks; null where the file omits it), device (Str, null unless the sample's
    ``metadata.device`` names it: mixed-device sweeps)

steps — one row per decode pass where ``T_decode_per_step`` exists:
    sample_key (Int64), k (Int64, 1-based pass index), T_decode_pass (Float64 ms, mean
    over runs), n_runs (Int64)
"""

from toolkit.data.loader import (
    SAMPLE_SCHEMA,
    STEP_SCHEMA,
    LoadResult,
    discover_datasets,
    load_results,
)

__all__ = ["SAMPLE_SCHEMA", "STEP_SCHEMA", "LoadResult", "discover_datasets", "load_results"]
