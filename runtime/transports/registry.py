"""Pick the transport that reaches a server of a given provider."""

from __future__ import annotations

from pathlib import Path

from runtime.settings import Settings
from runtime.transports.base import Transport


def build_transport(provider: str, settings: Settings) -> Transport:
    if provider == "local":
        from runtime.transports.local import LocalTransport

        return LocalTransport()
    from runtime.transports.ssh import SshTransport

    env = settings.provider_env
    keys = [Path(p) for p in env.get("PROVISIONING_SSH_KEYS", "").split(":") if p]
    known_hosts = env.get("PROVISIONING_SSH_KNOWN_HOSTS")
    return SshTransport(
        known_hosts=Path(known_hosts) if known_hosts else None,
        client_keys=keys,
        username=env.get("PROVISIONING_SSH_USER", "root"),
        port=int(env.get("PROVISIONING_SSH_PORT", "22")),
        host_override=env.get("PROVISIONING_SSH_HOST") or None,
        host_key=env.get("PROVISIONING_SSH_HOST_KEY") or None,
        username_from="server_name"
        if env.get("PROVISIONING_SSH_USER_FROM") == "server_name"
        else "fixed",
    )
