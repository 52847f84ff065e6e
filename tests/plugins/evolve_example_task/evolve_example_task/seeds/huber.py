"""Use the squared residual near zero and the absolute residual beyond delta, so outliers pull with a bounded force.

Huber loss (Huber 1964, "Robust Estimation of a Location Parameter"), with delta from the task's settings.
"""

import torch


def huber(self, residuals):
    size = torch.abs(residuals)
    quadratic = 0.5 * torch.square(residuals)
    linear = self.delta * (size - 0.5 * self.delta)
    return torch.where(size <= self.delta, quadratic, linear)
