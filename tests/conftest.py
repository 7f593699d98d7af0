pytest_plugins = ["tests.fhir_server.pytest_plugin", "tests.postgres_plugin"]
