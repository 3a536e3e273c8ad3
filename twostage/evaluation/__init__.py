"""Judging and tuning a trained pair: `score` (a CSV against a labelled data root, and by a
metadata column), `evaluate` (global vs fused: table and pictures), `calibrate` (per-class
fusion weights on the validation fold), `ensemble` (several models' CSVs or probabilities into
one) and `visualize`."""
