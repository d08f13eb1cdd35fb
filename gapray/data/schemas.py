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
    # The external judge's verdict (gapray/judges/: the shapes-world oracle or a VLM); null where none applies.
    # The name is historical (the oracle was the only external judge): kept, so run directories written
    # before the VLM judge stay readable; judge_model says which judge wrote it.
    pa.field("oracle_verdict", pa.int8()),
    pa.field("judge_model", pa.string()),  # "oracle" or the VLM's hub id / path; null: no external judge
    pa.field("judge_p", pa.float64()),  # the VLM judge's P("1") (logits) or parsed answer; null: the oracle, unparsed
])
JUDGE_COLUMNS = ("judge_model", "judge_p")  # added after oracle_verdict; files written before them lack both


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

# --- the Ray verdict pipeline (gapray/backends/ray.py) ------------------------------------------------

# Pipeline input: one row per prompt, with the sample indices still to draw (all K on a fresh round; the
# missing ones when a round resumes). `meta` is the GenEval metadata as JSON (null for plain-text prompts).
PROMPT_ROW_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("meta", pa.string()),
    pa.field("sample_idx", pa.list_(pa.int32()), nullable=False),
])

# Rescore input: one row per image drawn earlier (a ledger row's keys, tokens and summed log-prob), to be judged
# again by the serving policy.
RESCORE_ROW_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("meta", pa.string()),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("image_tokens", pa.list_(pa.int32()), nullable=False),
    pa.field("logprob", pa.float32(), nullable=False),  # summed over tokens, as the ledger keeps it
])

# The verdict ledger (ledger/round=R/part-*.parquet): every verdict row of a round, keyed by
# (round, prompt_id, sample_idx), with the policy version whose weights drew and judged the image.
LEDGER_SCHEMA = pa.schema([
    pa.field("round", pa.int32(), nullable=False),
    *VERDICT_SCHEMA,
    pa.field("policy_version", pa.int64(), nullable=False),
])



def without_judge_columns(schema: pa.Schema) -> pa.Schema:
    """A schema as gapray wrote it before judge_model/judge_p existed (integrity checks accept both)."""
    return pa.schema([f for f in schema if f.name not in JUDGE_COLUMNS])


# Earlier versions of a schema that files in existing run directories may hold: readable, never written.
EARLIER_SCHEMAS = {"VERDICT_SCHEMA": [without_judge_columns(VERDICT_SCHEMA)],
                   "LEDGER_SCHEMA": [without_judge_columns(LEDGER_SCHEMA)]}

# The discard pool (data/round=R/discard.parquet): prompts none of whose images the model accepted
# (PAPER.md, Algorithm 1, B), kept for curriculum replay.
DISCARD_SCHEMA = pa.schema([
    pa.field("round", pa.int32(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("n_images", pa.int32(), nullable=False),
    pa.field("n_unparsed", pa.int32(), nullable=False),  # generate-mode answers that did not parse
    pa.field("max_p_aligned", pa.float64()),  # the closest call; null when no answer parsed
])
