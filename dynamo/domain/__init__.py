"""The request domain: what a request is, from the message that asks for it to the
bodies published about it.

- `dynamo.domain.genreq`: the one model of a `genreq` message (`GenreqMessage`, shared
  by the broker door and the HTTP API), parsing and validating it (`parse_message`).
- `dynamo.domain.json_body`: any bytes to a JSON object, bounded (`load_object`).
- `dynamo.domain.jobs`: the values that travel through the actors' channels (`Job`,
  `Step`, `State`, `Reason`, `Failure`, `Viewer`, `Style`).
- `dynamo.domain.prompts`: the text sent to OpenAI and shown on stream.
- `dynamo.domain.published`: the bodies published to RabbitMQ (onscreen events and
  results, contract section 3).
- `dynamo.domain.viewer_messages`: the sentence shown to a viewer per failure reason.
"""
