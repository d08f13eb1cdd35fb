"""Data: the verdict ledger, the preference data built from it, the Arrow schemas of everything gapray writes and
their integrity checks. No Ray here: the Ray Data pipeline is gapray/backends/ray.py."""
