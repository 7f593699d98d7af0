pytest_plugins = ["tests.fhir_server.pytest_plugin"]
