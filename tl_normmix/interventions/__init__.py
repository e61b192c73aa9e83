"""Interventions on token edges (METHODS §5): knock-outs, first-order attribution, circuits kept
alone, and how well each map predicts them. They use the model and the per-source terms, never the
other way round."""
