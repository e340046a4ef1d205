"""The RabbitMQ port.

- `dynamo.rabbitmq.broker`: `Broker` (topology of contract section 2, manual acks,
  publisher confirms), `LogBroker`, `open_broker`, `Delivery`.
"""
