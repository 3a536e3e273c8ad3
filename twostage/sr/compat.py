"""Import shims for third-party packages; the one place they live.

basicsr 1.4.2 imports `torchvision.transforms.functional_tensor`, removed from current
torchvision. `import_basicsr()` registers a tiny stand-in module before importing it.
"""
from __future__ import annotations

import sys
import types


def install_functional_tensor_shim() -> None:
    """Provide `torchvision.transforms.functional_tensor.rgb_to_grayscale` if torchvision lacks it."""
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional

    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = shim


def import_basicsr():
    """Import and return the `basicsr.archs` needed for Real-ESRGAN, with the shim applied first."""
    install_functional_tensor_shim()
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from basicsr.archs.srvgg_arch import SRVGGNetCompact

    return RRDBNet, SRVGGNetCompact
