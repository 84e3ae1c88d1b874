from tests.integration.ray_fixtures import orchestrator, ray_session  # noqa: F401
