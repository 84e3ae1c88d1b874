"""Names of the actors in Ray namespace ``provisioning`` (what the dashboard shows)."""

NAMESPACE = "provisioning"
ORCHESTRATOR = "orchestrator"
CHECKPOINT = "checkpoint"
PROVIDER_POOL = "provider-pool"


def workflow_actor(workflow_id: str) -> str:
    return f"workflow:{workflow_id}"


def operation_actor(workflow_id: str, op_id: str) -> str:
    return f"op:{workflow_id}:{op_id}"
