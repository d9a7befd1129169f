"""Paper-style figures regenerated from saved run records (never recomputed in the figure code)."""
