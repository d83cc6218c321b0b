"""DDIM schedule arithmetic shared by inversion, the drag loop and denoising (DESIGN.md stage 2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Union

import torch
from diffusers import DDIMScheduler


@dataclass(frozen=True)
class DdimSchedule:
    """The fixed timesteps of an edit and the alphas each DDIM step needs.

    `timesteps` are in sampling order (981, 961, ..., 1 for 50 steps); the edit inverts to
    `drag_timestep = timesteps[num_inference_steps - num_inversion_steps]` and denoises from there.
    """

    timesteps: List[int]
    step_size: int
    alphas_cumprod: torch.Tensor   # (1000,) float64 on the CPU
    final_alpha_cumprod: float
    num_inversion_steps: int
    prediction_type: str = "epsilon"  # what the UNet's output stands for (`predicted_noise`)

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, num_inference_steps: int, num_inversion_steps: int) -> "DdimSchedule":
        scheduler.set_timesteps(num_inference_steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        return cls(
            timesteps=timesteps,
            step_size=scheduler.config.num_train_timesteps // num_inference_steps,
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64).cpu(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            num_inversion_steps=min(num_inversion_steps, num_inference_steps),
            prediction_type=prediction_type_of(scheduler),
        )

    @property
    def drag_timestep(self) -> int:
        return self.timesteps[len(self.timesteps) - self.num_inversion_steps]

    @property
    def denoise_timesteps(self) -> List[int]:
        """Sampling-order timesteps from the drag timestep down (35 at the defaults)."""
        return self.timesteps[len(self.timesteps) - self.num_inversion_steps:]

    @property
    def inversion_timesteps(self) -> List[int]:
        """Timesteps inversion predicts at, in order (1, 21, ..., 681 at the defaults)."""
        return list(reversed(self.denoise_timesteps))

    def alpha(self, t: int) -> float:
        """alphas_cumprod[t], or the final alpha for a negative t."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def noise(self, prediction: torch.Tensor, latents: torch.Tensor, t: int) -> torch.Tensor:
        """The noise that the UNet's `prediction` at timestep `t` on `latents` stands for."""
        return predicted_noise(prediction, latents, self.alpha(t), self.prediction_type)

    def step_coefficients(self, t: int) -> tuple:
        """(alpha at t, alpha at t - step_size): what a DDIM step between them needs."""
        return self.alpha(t), self.alpha(t - self.step_size)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type_of(scheduler: DDIMScheduler) -> str:
    """The scheduler's `prediction_type` (SD 1.x and SD 2.x-base: "epsilon"; SD 2.x at 768 px:
    "v_prediction"), refused by name when the stages cannot read noise from it."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    check_prediction_type(kind)
    return kind


def check_prediction_type(kind: str) -> None:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} is not supported: use one of {', '.join(PREDICTION_TYPES)}")


Alpha = Union[float, torch.Tensor]


def predicted_noise(prediction: torch.Tensor, latents: torch.Tensor, alpha: Alpha, prediction_type: str) -> torch.Tensor:
    """The noise a UNet output stands for, given the `latents` it saw and `alpha` (alphas_cumprod at the
    timestep it was given): the output itself for "epsilon", `sqrt(a)·v + sqrt(1-a)·x` for
    "v_prediction", `(x - sqrt(a)·x0) / sqrt(1-a)` for "sample". Every stage reads noise, so a model
    of any of the three runs through the same DDIM arithmetic. The alpha is the model's timestep's,
    also in inversion, where the latent is one step below it: the output is converted as the model
    meant it (diffusers' `DDIMInverseScheduler` uses the latent's own alpha instead)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return alpha ** 0.5 * prediction + (1 - alpha) ** 0.5 * latents
    return (latents - alpha ** 0.5 * prediction) / (1 - alpha) ** 0.5  # "sample"


def training_target(latents: torch.Tensor, noise: torch.Tensor, alpha: Alpha, prediction_type: str) -> torch.Tensor:
    """What the UNet should output for `latents` noised with `noise` at `alpha` (the LoRA's MSE target):
    the noise, the velocity `sqrt(a)·noise - sqrt(1-a)·x0` (diffusers' `get_velocity`), or the clean latents."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha ** 0.5 * noise - (1 - alpha) ** 0.5 * latents
    return latents  # "sample"


def noised(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
           alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process at `timesteps` (the scheduler's `add_noise`, with `alphas_cumprod` already
    on the device, so nothing is copied from the host: a CUDA graph can hold it)."""
    alpha = alphas_cumprod[timesteps].view(-1, *[1] * (latents.dim() - 1))
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def ddim_move(x: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Deterministic DDIM map of `x` (at `alpha_from`) to `alpha_to`, given the predicted noise."""
    x0 = (x - (1.0 - alpha_from) ** 0.5 * eps) / alpha_from ** 0.5
    return alpha_to ** 0.5 * x0 + (1.0 - alpha_to) ** 0.5 * eps


def ddim_step(schedule: DdimSchedule, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """One denoising step from t to t - step_size."""
    a_t, a_prev = schedule.step_coefficients(t)
    return ddim_move(x, eps, a_t, a_prev)


def ddim_inversion_step(schedule: DdimSchedule, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """One inversion step from t - step_size up to t (eps predicted at t on the current latent)."""
    a_t, a_prev = schedule.step_coefficients(t)
    return ddim_move(x, eps, a_prev, a_t)
