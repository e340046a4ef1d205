"""Prometheus metrics, one registry for the process, served at GET /metrics."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from dynamo.version import version

REGISTRY = CollectorRegistry(auto_describe=True)

# Step latencies run from well under a second (ledger) to a minute or more (image
# generation behind the rate limit), hence the wide buckets.
_STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

# dynamo_build_info{version="..."} 1: which version runs.
BUILD_INFO = Info("dynamo_build", "The running dynamo", registry=REGISTRY)
BUILD_INFO.info({"version": version()})
REQUESTS_RECEIVED = Counter(
    "dynamo_requests_received_total", "Requests stored, by source", ["source"], registry=REGISTRY
)
REQUESTS_FINISHED = Counter(
    "dynamo_requests_finished_total",
    "Requests that reached an end state, by outcome and failure reason",
    ["outcome", "reason"],
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "dynamo_step_seconds",
    "Time spent in one pipeline step",
    ["step"],
    buckets=_STEP_BUCKETS,
    registry=REGISTRY,
)
OPENAI_CALLS = Counter(
    "dynamo_openai_calls_total",
    "OpenAI API calls, by kind and status",
    ["kind", "status"],
    registry=REGISTRY,
)
OPENAI_RATE_LIMITED = Counter(
    "dynamo_openai_429_total",
    "OpenAI answers with status 429, by kind",
    ["kind"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "dynamo_retries_total", "Retried external calls, by system", ["system"], registry=REGISTRY
)
QUEUE_DEPTH = Gauge(
    "dynamo_channel_used", "Items buffered in a channel", ["channel"], registry=REGISTRY
)
QUEUE_CAPACITY = Gauge(
    "dynamo_channel_capacity", "Capacity of a channel", ["channel"], registry=REGISTRY
)
ACTOR_RESTARTS = Counter(
    "dynamo_actor_restarts_total", "Actor restarts after a crash", ["actor"], registry=REGISTRY
)
DEAD_LETTERS = Counter(
    "dynamo_dead_letters_total",
    "Input messages dead-lettered: invalid, or their handling crashed 3 times",
    registry=REGISTRY,
)
ORPHAN_DEBITS = Counter(
    "dynamo_orphan_debits_total",
    "Debits that may be pending at the ledger without their id stored",
    registry=REGISTRY,
)
DISCORD_POSTS = Counter(
    "dynamo_discord_posts_total",
    "Discord webhook posts, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
OPENAI_SPEND_USD = Counter(
    "dynamo_openai_spend_usd_total",
    "USD spent on OpenAI calls (usage x the price table), by model and kind of call",
    ["model", "kind"],
    registry=REGISTRY,
)
MODEL_SHUTDOWN_DAYS = Gauge(
    "dynamo_model_shutdown_days",
    "Days until a configured model's announced shutdown (absent: none announced)",
    ["model"],
    registry=REGISTRY,
)
UNREADABLE_REQUESTS = Counter(
    "dynamo_unreadable_requests_total",
    "Stored requests the resume sweep could not read (failed and refunded where it could)",
    registry=REGISTRY,
)
DEPENDENCY_UP = Gauge(
    "dynamo_dependency_up",
    "1 while a dependency (database, broker) is reachable, 0 during an outage",
    ["dependency"],
    registry=REGISTRY,
)
OUTAGES = Counter(
    "dynamo_outages_total",
    "Outages of a dependency (database, broker) seen by this process",
    ["dependency"],
    registry=REGISTRY,
)
OUTAGE_RESTARTS = Counter(
    "dynamo_actor_outage_restarts_total",
    "Actor restarts after it stopped because a dependency was unreachable (not counted "
    "against the restart intensity)",
    ["actor"],
    registry=REGISTRY,
)
ALERTS_REPUBLISHED = Counter(
    "dynamo_alerts_republished_total",
    "Alerts published again because the broker's confirm of the first copy was lost with "
    "its connection (the copy may be on stream twice)",
    registry=REGISTRY,
)
RESULTS_REPUBLISHED = Counter(
    "dynamo_results_republished_total",
    "Results published again because the broker's confirm of the first copy was lost with "
    "its connection",
    registry=REGISTRY,
)
ADOPTED_DEBITS = Counter(
    "dynamo_adopted_debits_total",
    "Pending debits found in the ledger's history after a crash during reservation, and "
    "taken as the interrupted request's own instead of reserving again",
    registry=REGISTRY,
)
JOB_ERRORS = Counter(
    "dynamo_job_errors_total",
    "Jobs whose step raised unexpectedly (a bug): each failed alone, by actor",
    ["actor"],
    registry=REGISTRY,
)
