"""Shared pytest configuration: fixture plugins live in their own modules."""

pytest_plugins = ["fixtures_trees", "registry_fixture", "daemon_support"]
