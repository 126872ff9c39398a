"""Stage 4, unlearning: the forget API, unlearning metrics, baselines and the report."""
