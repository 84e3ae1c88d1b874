"""Errors raised while loading a workflow. The runtime's tree extends these."""

from __future__ import annotations


class ProvisioningError(Exception):
    """Base of every error this project raises on purpose."""


class InputError(ProvisioningError):
    """The user's input is wrong. The message names the place (file, line, field)."""
