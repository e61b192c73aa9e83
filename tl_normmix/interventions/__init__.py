"""Interventions on token edges (methods.md#interventions-on-edges): knock-outs, first-order
attribution, circuits kept alone, and how well each map predicts them. They use the model and the
per-source terms, never the other way round."""
