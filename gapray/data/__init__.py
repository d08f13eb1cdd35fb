"""Data: the Arrow schemas of everything gapray writes, and (with Ray) the verdict pipeline."""
