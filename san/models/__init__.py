"""Backbones; importing this package registers every model with `san.registry`."""

from san.models import lenet, lstm, resnet, vgg  # noqa: F401  (imported for their @register_model)
