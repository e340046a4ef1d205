"""The tests' time limits, in one place: every test runs under an absolute `fail_after`.

Real seconds bound a test that waits on real sockets, processes or a browser; they are
generous because the CI machine has two cores shared by several workers. Virtual seconds
bound a test on the `autojump_clock`, where waiting costs nothing: they only have to
outlast every backoff and sweep the test goes through.
"""

# -- real time ---------------------------------------------------------------------------
FAKES_S = 20  # in-process fakes only (fake OpenAI, Discord, auth, ledger, S3)
PORT_S = 30  # one port against the real system or a fake over HTTP
SLOW_S = 60  # several ports, or a change feed, against the real systems
SDK_S = 90  # the real OpenAI SDK against the fake, through a running service
SERVICE_S = 180  # dynamo processes (or a browser) started and stopped within the test
FUZZ_S = 300  # a fuzz run against a running service
STARTUP_S = 60  # one dynamo process, from its start to /readyz

# -- virtual time (autojump_clock) --------------------------------------------------------
VIRTUAL_S = 3600  # an actor's outages, backoffs and sweeps, instantly
VIRTUAL_HOURS_S = 6 * 3600  # outage tests that span hours, instantly
