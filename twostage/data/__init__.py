"""The dataset on disk: its `layout` (which images, in which order, `--shard`), the
`annotations` JSON and its rasterising, label `fixes`, the per-person `metadata` table, the
`masks` of a sample and their cache, phantom hands that follow it (`synth`) and the `check` of
a data root."""
