"""Build a provider adapter by name from the settings of this process."""

from __future__ import annotations

from runtime.providers.base import Provider
from runtime.settings import Settings


def build_provider(name: str, settings: Settings) -> Provider:
    # Imported lazily so a local-only run never loads boto3 or upcloud_api.
    if name == "local":
        from runtime.providers.local import LocalProvider

        return LocalProvider(settings.local_dir, ready_delay=settings.local_ready_delay)
    if name == "upcloud":
        from runtime.providers.upcloud import UpCloudProvider

        extra = {} if settings.poll_interval is None else {"poll_interval": settings.poll_interval}
        return UpCloudProvider.from_env(dict(settings.provider_env), **extra)
    if name == "aws":
        from runtime.providers.aws import AwsProvider

        interval = 5.0 if settings.poll_interval is None else settings.poll_interval
        return AwsProvider.from_env(environ=dict(settings.provider_env), poll_interval=interval)
    raise ValueError(f"unknown provider {name!r}")
