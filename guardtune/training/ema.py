"""An exponential moving average of the trained tensors (`finetune --use-ema`).

diffusers' training scripts keep an EMA copy of the UNet and save it as the result; this keeps
one of the tensors that train (the unfrozen UNet tensors, or the LoRA adapters), never of the
frozen ones, so the average cannot move what the policy freezes. The decay warms up as
diffusers' `EMAModel` does by default: min(decay, (1 + n) / (10 + n)) after n updates, so early
steps are not averaged with the random or pretrained start for thousands of steps. The shadow
tensors are checkpointed with the run, so a resumed run averages exactly as an unbroken one.
"""

from __future__ import annotations

import torch


class EmaWeights:
    def __init__(self, trainable: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone().float() for n, p in trainable.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        """Move the shadow towards the weights after an optimizer step."""
        keep = self.current_decay()
        for name, parameter in trainable.items():
            self.shadow[name].lerp_(parameter.detach().float(), 1 - keep)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        """Put the averaged weights into the model (as the result to write)."""
        for name, parameter in trainable.items():
            parameter.copy_(self.shadow[name].to(parameter.device, parameter.dtype))

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load(self, shadow: dict[str, torch.Tensor], updates: int) -> None:
        if set(shadow) != set(self.shadow):
            raise ValueError("the EMA state does not hold this run's trainable tensors")
        self.shadow = {n: t.float().to(self.shadow[n].device) for n, t in shadow.items()}
        self.updates = updates
