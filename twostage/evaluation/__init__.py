"""Judging and tuning a trained pair: `evaluate` (score and pictures on a labelled set),
`calibrate` (per-class fusion weights on the validation fold), `ensemble` (several models'
CSVs or probabilities into one) and `visualize`."""
