"""twostage: hand-bone X-ray segmentation with a super-resolved palm specialist."""
import os

# albumentations checks PyPI for a newer release on import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
