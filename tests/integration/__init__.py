"""Integration tests: the real RabbitMQ and PostgreSQL, dynamo as a subprocess or its ports
against the real systems, the fake HTTP services of tests/fakes/."""
