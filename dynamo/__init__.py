"""dynamo: Golden VCR image alerts. Everything that is not an actor (actors/ has those):
configuration, logging, metrics, the ports and the wiring (`dynamo.service`). The
`dynamo` command is `dynamo.cli`. A regular package (not a namespace one), so that its
files (the schema, the live page) are found with `importlib.resources` in every install."""
