"""Super-resolution of palm crops: the upscalers (`upscale`), their weights (`weights`), the
palm set built with them (`prepare`, the `prepare-sr` command), and an X-ray upscaler trained
on the user's own images (`training`, with its config `train_config`, data `patches`, held-out
scores `quality`, `network`, `discriminator` and the Real-ESRGAN degradation of `degrade`).

`twostage.sr.make_upscaler` and `twostage.sr.Upscaler` are the names users import; they live
in `upscale`.
"""
from .upscale import UPSCALERS, Upscaler, make_upscaler, network_upscaler

__all__ = ["UPSCALERS", "Upscaler", "make_upscaler", "network_upscaler"]
