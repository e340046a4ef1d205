"""Unit tests: one module or one actor at a time, with fakes (tests/fakes/) and mocks, no
real RabbitMQ, PostgreSQL or service process."""
