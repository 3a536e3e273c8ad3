"""train-sr's discriminator (loss.gan > 0), kept apart from the loop: basicsr's, so loss.gan
means what it means in Real-ESRGAN."""
from __future__ import annotations

from ..errors import TwostageError
from .train_config import SRConfig


class Discriminator:
    """Real-ESRGAN's adversarial part: basicsr's U-Net discriminator with spectral norm and its GAN loss."""

    def __init__(self, cfg: SRConfig, dev):
        import torch
        from basicsr.archs.discriminator_arch import UNetDiscriminatorSN
        from basicsr.losses.gan_loss import GANLoss

        self.net = UNetDiscriminatorSN(3, num_feat=cfg.optim.d_feat, skip_connection=True).to(dev).train()
        self.loss = GANLoss("vanilla", real_label_val=1.0, fake_label_val=0.0, loss_weight=cfg.loss.gan).to(dev)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.optim.d_lr, betas=(0.9, 0.99))

    def generator_loss(self, out):
        """The generator's GAN loss; the discriminator is frozen meanwhile so it takes no gradient from it."""
        for p in self.net.parameters():
            p.requires_grad_(False)
        loss = self.loss(self.net(out), True, is_disc=False)
        for p in self.net.parameters():
            p.requires_grad_(True)
        return loss

    def step(self, fake, real) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.net(real), True, is_disc=True) + self.loss(self.net(fake), False, is_disc=True)
        loss.backward()
        self.opt.step()

    def state(self) -> dict:
        """Its part of the resumable state."""
        return {"net_d": self.net.state_dict(), "optim_d": self.opt.state_dict()}

    def load(self, state: dict) -> None:
        if "net_d" not in state:
            raise TwostageError("train-sr state: saved without the discriminator (loss.gan was 0)")
        self.net.load_state_dict(state["net_d"])
        self.opt.load_state_dict(state["optim_d"])

