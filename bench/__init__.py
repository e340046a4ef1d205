"""Benchmarks of dynamo as a whole: scripts that print figures, run from the repo root as
`python -m bench.<name>` (see bench/README.md). Not tests."""
