"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def load() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CLUSTER_YAML.read_text())
    return config


def validate(config: dict[str, Any]) -> None:
    """What `ray up` does: fill in the provider's defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_cluster_yaml_validates_against_rays_schema() -> None:
    validate(load())


def test_the_schema_check_is_real() -> None:
    broken = load()
    broken["head_start_ray_commands"] = [{"not": "a command"}]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_head_advertises_the_store_resource_and_commands_are_strings() -> None:
    config = load()
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all(isinstance(c, str) for c in commands)
    assert any("provisioning_store" in c for c in config["head_start_ray_commands"])
