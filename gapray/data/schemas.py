"""Arrow schemas of the Parquet files gapray writes. One module, so readers and writers agree."""

import pyarrow as pa

# One row per generated image: what was asked, what was drawn (token ids), and what the model said of it.
VERDICT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("image_tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("logprob", pa.float32(), nullable=False),  # sum over tokens, under the sampling distribution
    pa.field("p_aligned", pa.float64()),  # NaN when a generate-mode answer did not parse
    pa.field("verdict", pa.int8()),  # 1 aligned, 0 misaligned, null unparsed
    pa.field("answer", pa.string()),  # free-text answer (generate mode only)
])


def to_table(rows: list[dict], schema: pa.Schema = VERDICT_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)

# SFT data (PAPER.md, Algorithm 1): every accepted image, with the prompt that produced it.
SFT_SCHEMA = pa.schema([
    pa.field("round", pa.int32(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("image_tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("p_aligned", pa.float64(), nullable=False),
])

# DPO pairs: per prompt the most confident accepted image (chosen) and the least confident rejected one.
# Reference log-probs (sum over image tokens, conditional, under the reference model) are optional:
# when present the trainer needs no reference model.
DPO_SCHEMA = pa.schema([
    pa.field("round", pa.int32(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("chosen_tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_p", pa.float64(), nullable=False),
    pa.field("rejected_p", pa.float64(), nullable=False),
    pa.field("ref_chosen_logp", pa.float32()),
    pa.field("ref_rejected_logp", pa.float32()),
])
