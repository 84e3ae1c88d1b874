"""The AWS adapter's editable tables: plans to instance types, zones to regions.

No boto3 here: the planner, the docs and operators' own tools can read the tables
without loading the AWS SDK. ``load_tables`` reads overrides from a JSON file
(``PROVISIONING_AWS_TABLES``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from runtime.errors import PermanentError

__all__ = ["DEFAULT_PLANS", "DEFAULT_ZONES", "load_tables"]

DEFAULT_PLANS: dict[str, str] = {
    "1xCPU-1 GB": "t3.micro",
    "1xCPU-2 GB": "t3.small",
    "2xCPU-4 GB": "t3.medium",
    "2xCPU-8 GB": "t3.large",
    "4xCPU-8 GB": "t3.xlarge",
    "4xCPU-16 GB": "t3.xlarge",
    "8xCPU-32 GB": "t3.2xlarge",
}
# UpCloud-style zone names, so one workflow can name the same places on both clouds.
# A value may be a region or an availability zone (to pin the AZ).
DEFAULT_ZONES: dict[str, str] = {
    "de-fra1": "eu-central-1",
    "fi-hel1": "eu-north-1",
    "fi-hel2": "eu-north-1",
    "nl-ams1": "eu-west-1",
    "uk-lon1": "eu-west-2",
    "us-nyc1": "us-east-1",
    "us-chi1": "us-east-2",
    "us-sjo1": "us-west-1",
    "sg-sin1": "ap-southeast-1",
    "au-syd1": "ap-southeast-2",
}

_REGION = re.compile(r"^[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d+$")
_AZ = re.compile(r"^([a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d+)[a-z]$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")
_AMI = re.compile(r"^ami-[0-9a-f]{8,17}$")


def load_tables(path: str | Path) -> dict[str, dict[str, str]]:
    """Read table overrides: ``{"plans": {...}, "zones": {...}, "images": {region: ami}}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PermanentError(f"cannot read AWS tables from {path}: {exc}") from exc
    if not isinstance(data, dict) or not set(data) <= {"plans", "zones", "images"}:
        raise PermanentError(f"{path}: expected an object with plans, zones and/or images")
    tables: dict[str, dict[str, str]] = {}
    for name in ("plans", "zones", "images"):
        table = data.get(name, {})
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in table.items()
        ):
            raise PermanentError(f"{path}: {name} must map strings to strings")
        tables[name] = table
    return tables
