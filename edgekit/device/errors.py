"""Errors of the device runner; each message says what to do next."""

from __future__ import annotations

from edgekit.errors import EdgekitError


class DeviceError(EdgekitError):
    """The device or its agent reported a failure."""


class DeviceURLError(DeviceError):
    """A device URL that no transport understands."""


class DeviceConnectionError(DeviceError):
    """The link to the device could not be opened or was lost."""


class NoisyLinkError(DeviceConnectionError):
    """Too many damaged frames in a row: the link corrupts more than the protocol can mend."""


class DeviceTimeout(DeviceError):
    """The device did not answer in time."""


class DeployError(DeviceError):
    """An artifact could not be deployed; the previously deployed version is untouched."""


class ValidationError(DeviceError):
    """Validation inputs (dataset, reference model) are unusable."""
