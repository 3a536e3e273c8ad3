"""twostage: hand-bone X-ray segmentation with a super-resolved palm specialist."""
__version__ = "0.1.0"
