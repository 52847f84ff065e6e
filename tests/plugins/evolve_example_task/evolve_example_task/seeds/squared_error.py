"""Minimise the squared residual, the maximum-likelihood fit under Gaussian noise."""

import torch


def squared_error(residuals):
    return torch.square(residuals)
