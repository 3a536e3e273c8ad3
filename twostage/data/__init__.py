"""The dataset on disk: its `layout` (which images, in which order, `--shard`), the
`annotations` JSON and its rasterising, label `fixes`, the per-person `metadata` table, the
`masks` of a sample and their cache, the palm set prepare-sr writes (`palm_set`), the record of
a pseudo-labelled root (`pseudo_record`), phantom hands that follow the layout (`synth`) and
the `check` of a data root."""
