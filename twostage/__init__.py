"""twostage: hand-bone X-ray segmentation with a super-resolved palm specialist.

Packages by pipeline step, bottom to top (docs/DESIGN.md §6): the shared primitives here
(classes, box, fusion, rle, metrics, models, io, ...), `data`, `train`, `sr`, `inference`,
`evaluation`, and the commands (`cli`, `demo`)."""
__version__ = "0.1.0"
