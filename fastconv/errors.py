"""fastconv's exceptions. Each is also a ``RuntimeError``, the class torch raises for the same
mistakes, so code written around torch.nn.functional.conv2d catches them unchanged."""
from __future__ import annotations


class InvalidConvolution(ValueError, RuntimeError):
    """The arguments do not describe a valid convolution (shapes, stride, padding, ...)."""


class UnsupportedTensor(TypeError, RuntimeError):
    """A tensor's dtype or device is not one this call can run on, or tensors disagree."""


class AlgorithmUnavailable(ValueError, RuntimeError):
    """An explicitly requested algorithm cannot run this call; the message says why."""
