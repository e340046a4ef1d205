"""The OpenAI port: every call to the OpenAI API, what it costs and what it taught us.

Named `openai_port`, not `openai`, so that it is never taken for the SDK.

- `dynamo.openai_port.client`: `OpenAIGenerator` (moderation, a friend's name, the image,
  the model catalogue) and `OfflineGenerator`.
- `dynamo.openai_port.call`: `call_openai`, one call as every caller makes it (permit,
  call, outcome).
- `dynamo.openai_port.errors`: SDK exceptions in, the service's errors out
  (`classify_openai`, `ModelNotFound`, `ParameterLearned`).
- `dynamo.openai_port.catalogue`: the configured models as the API's catalogue knows them.
- `dynamo.openai_port.dialect`: how each model family is asked (`Dialect`, `ImageOrder`).
- `dynamo.openai_port.pricing`: `PriceTable`, prices and expected image tokens.
- `dynamo.openai_port.spend`: `Spend`, each call's cost and the daily budget.
- `dynamo.openai_port.rate_headers`: the `x-ratelimit-*` headers of OpenAI's answers.
"""
