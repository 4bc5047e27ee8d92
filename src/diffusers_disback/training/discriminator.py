"""DMD2's discriminator head for the optional GAN term, and the fake score that carries it."""

from __future__ import annotations

import torch


class DiscriminatorHead(torch.nn.Module):
    """
    DMD2's "classifier on clean image": a conv head on the fake score's mid-block features -> one logit per sample.

    As DMD2 builds it for SDXL at 1024 (mid-block features 32x32): stride-2 4x4 convs (each with GroupNorm and SiLU)
    while the features are larger than 4x4, one conv whose kernel and stride are the remaining size (4x4 -> 1x1),
    then a 1x1 conv to the logit. `size` is the mid-block's spatial size (the latent size / 2^(down blocks - 1)).
    """

    def __init__(self, channels: int, size: int, groups: int = 32):
        super().__init__()
        groups = min(groups, channels)
        layers = []
        while size > 4:
            layers += [
                torch.nn.Conv2d(channels, channels, 4, 2, 1),
                torch.nn.GroupNorm(groups, channels),
                torch.nn.SiLU(),
            ]
            size //= 2
        layers += [
            torch.nn.Conv2d(channels, channels, size, size),
            torch.nn.GroupNorm(groups, channels),
            torch.nn.SiLU(),
        ]
        self.net = torch.nn.Sequential(*layers, torch.nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).flatten(1).squeeze(1)


class FakeScoreWithHead(torch.nn.Module):
    """
    The fake score with the discriminator head, as one module (so DDP/FSDP see one model and one optimizer). Called
    like a UNet it returns `(eps,)`; with `classify=True` it returns `(eps, logits)` from the same forward pass, the
    head reading the mid-block output through a forward hook.
    """

    def __init__(self, unet: torch.nn.Module, latent_size: int):
        super().__init__()
        self.unet = unet
        mid_size = latent_size // 2 ** (len(unet.config.down_block_types) - 1)
        self.head = DiscriminatorHead(unet.config.block_out_channels[-1], mid_size)
        self._features: list[torch.Tensor] = []
        unet.mid_block.register_forward_hook(lambda module, args, output: self._features.append(output))

    @property
    def config(self):
        return self.unet.config

    @staticmethod
    def unet_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet's part of a (gathered) state dict of this module, keyed as the bare UNet's: what a path node
        stores."""
        return {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        added_cond_kwargs=None,
        return_dict=False,
        classify: bool = False,
    ):
        self._features.clear()
        eps = self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        if not classify:
            return (eps,)
        return eps, self.head(self._features[-1].float())


class SDXLGanTerm:
    """
    DMD2's GAN term for SDXL, as the training steps take it (`diffusers_disback.distill.GanTerm`): the discriminator
    head of a [`FakeScoreWithHead`] classifies noised latents (the diffusion GAN: `t ~ U{0..T-1}`).

    Args:
        score: the [`FakeScoreWithHead`] (possibly prepared by accelerate) whose head is the discriminator.
        real_batch: `() -> (latents, cond)`: real images encoded to latents, with their captions' conditioning.
        noise_schedule: the teacher's `NoiseSchedule`.
        rng: the training noise generator.
        discriminator_weight: weight of the discriminator loss added to the score's (DMD2: 1e-2).
        generator_weight: weight of the generator's GAN loss (DMD2 SDXL: 5e-3).
    """

    def __init__(self, score, real_batch, noise_schedule, rng, discriminator_weight: float, generator_weight=0.0):
        self.score = score
        self.real_batch = real_batch
        self.noise_schedule = noise_schedule
        self.rng = rng
        self.discriminator_weight = discriminator_weight
        self.generator_weight = generator_weight

    def classify(self, x0: torch.Tensor, cond: dict, t: torch.Tensor | None = None, noise=None):
        """Noises `x0` at `t ~ U{0..T-1}` and runs the score with its head: `(eps, logits)`."""
        schedule = self.noise_schedule
        if t is None:
            t = schedule.sample_timesteps(x0.shape[0], generator=self.rng, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=self.rng).to(x0.device)
        x_t = schedule.add_noise(x0, noise, t)
        dtype = next(p.dtype for p in self.score.parameters() if p.is_floating_point())
        return self.score(
            x_t.to(dtype),
            t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
            classify=True,
        )

    def score_loss(self, x0: torch.Tensor, cond: dict):
        """
        The score's loss with the discriminator's, in one forward pass (one backward, as DDP/FSDP want): generated
        and real latents are noised together; the generated half gives the denoising loss (Eq. 7), both halves the
        discriminator loss `softplus(D(fake)) + softplus(-D(real))`.
        """
        from ..distill import gan_discriminator_loss

        real, real_cond = self.real_batch()
        both = torch.cat([x0.detach().float(), real])
        t = self.noise_schedule.sample_timesteps(both.shape[0], generator=self.rng, device=both.device)
        noise = torch.randn(both.shape, generator=self.rng).to(both.device)
        eps, logits = self.classify(both, {k: torch.cat([cond[k], real_cond[k]]) for k in cond}, t, noise)
        n = x0.shape[0]
        loss_dsm = torch.nn.functional.mse_loss(eps[:n].float(), noise[:n].float())
        loss_d = gan_discriminator_loss(logits[:n], logits[n:])
        return loss_dsm + self.discriminator_weight * loss_d, {"discriminator_loss": loss_d.detach()}

    def generator_loss(self, x0: torch.Tensor, cond: dict) -> torch.Tensor:
        """The generator's non-saturating loss on its samples (unweighted)."""
        from ..distill import gan_generator_loss

        return gan_generator_loss(self.classify(x0, cond)[1])
