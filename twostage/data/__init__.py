"""The dataset on disk: its layout, annotations, label fixes, metadata and mask cache
(`layout`), phantom hands that follow it (`synth`) and the `check` of a data root."""
