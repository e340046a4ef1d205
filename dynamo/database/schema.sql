-- dynamo's schema. Applied at every startup: safe to apply again, and upgrades a database
-- made by the original Go service's four migrations (dynamo.image_request, dynamo.image,
-- dynamo.answer), keeping its rows.

create schema if not exists dynamo;

-- The original tables, as its migrations 002-004 created them.
create table if not exists dynamo.image_request (
    id                  uuid primary key,
    twitch_user_id      text not null,
    broadcast_id        integer,
    screening_id        uuid,
    style               text not null,
    inputs              jsonb not null,
    prompt              text not null,
    created_at          timestamptz not null default now(),
    finished_at         timestamptz,
    error_message       text
);

create table if not exists dynamo.image (
    image_request_id uuid not null,
    index            integer not null,
    url              text not null,
    color            text not null default '#000000',
    constraint image_request_id_fk
        foreign key (image_request_id) references dynamo.image_request (id),
    constraint image_request_id_index_unique unique (image_request_id, index)
);

-- Migration 004 added color as nullable, backfilled it and then set it not null.
alter table dynamo.image add column if not exists color text;
update dynamo.image set color = '#000000' where color is null;
alter table dynamo.image alter column color set not null;

create table if not exists dynamo.answer (
    image_request_id uuid not null,
    prompt           text not null,
    value            text not null,
    constraint image_request_id_fk
        foreign key (image_request_id) references dynamo.image_request (id)
);

-- What dynamo adds to a request: the pipeline's persisted step and what each step stored.
alter table dynamo.image_request
    add column if not exists twitch_display_name text,
    add column if not exists step text,
    add column if not exists state text,
    add column if not exists source text not null default 'legacy',
    add column if not exists message_key text,
    add column if not exists body_sha256 text,
    add column if not exists intake_acked boolean not null default true,
    add column if not exists expires_at timestamptz,
    add column if not exists points_cost integer not null default 0,
    add column if not exists flow_id text,
    add column if not exists orphan_suspected boolean not null default false,
    add column if not exists failure_reason text,
    add column if not exists failure_detail text,
    add column if not exists announced_at timestamptz,
    add column if not exists accepted_at timestamptz,
    add column if not exists refunded_at timestamptz,
    add column if not exists discord_posted_at timestamptz,
    add column if not exists owner uuid,
    add column if not exists updated_at timestamptz not null default now();

-- Rows of the original service are finished history: its in-flight requests died with it.
update dynamo.image_request set
    step = 'done',
    state = case when error_message is null and finished_at is not null
                 then 'succeeded' else 'failed' end,
    failure_reason = case when error_message is null and finished_at is not null
                          then null else 'error' end,
    finished_at = coalesce(finished_at, now())
where step is null;

alter table dynamo.image_request alter column step set not null;
alter table dynamo.image_request alter column state set not null;

create unique index if not exists image_request_message_key_unique
    on dynamo.image_request (message_key);
create index if not exists image_request_unfinished
    on dynamo.image_request (created_at) where step <> 'done';
create index if not exists image_request_viewer_created
    on dynamo.image_request (twitch_user_id, created_at desc, id desc);
create index if not exists image_request_created
    on dynamo.image_request (created_at desc, id desc);
create index if not exists image_request_body_unacked
    on dynamo.image_request (body_sha256) where not intake_acked;

-- The raw generated image, kept between generation and upload so that a crash there
-- does not pay for the image twice. Deleted once the processed image is stored.
create table if not exists dynamo.generated_image (
    image_request_id uuid primary key references dynamo.image_request (id),
    data             bytea not null,
    created_at       timestamptz not null default now()
);

-- HTTP Idempotency-Key: per caller, the first answer for a key.
create table if not exists dynamo.idempotency_key (
    caller           text not null,
    key              text not null,
    body_sha256      text not null,
    image_request_id uuid not null references dynamo.image_request (id),
    created_at       timestamptz not null default now(),
    primary key (caller, key)
);

-- Running dynamo processes. A request belongs to the process in its `owner` column while
-- that process's heartbeat is fresh; after that any process resumes it.
create table if not exists dynamo.worker (
    id           uuid primary key,
    started_at   timestamptz not null default now(),
    heartbeat_at timestamptz not null default now()
);
-- Where the process runs, so that a process on the same host can tell at once that an
-- earlier one died (its pid is gone) instead of waiting for its lease to run out.
alter table dynamo.worker
    add column if not exists hostname text,
    add column if not exists pid integer;

-- Issue 9: what each OpenAI call of a request was, and what it cost. One row per answered
-- call (moderation, a friend's name, the image): its model, the answer's `usage` as the
-- API sent it, and its USD cost by the price table. Spend today / this month and the daily
-- budget are sums over this table, so processes sharing the database share the budget.
create table if not exists dynamo.openai_call (
    id               bigserial primary key,
    image_request_id uuid not null references dynamo.image_request (id),
    kind             text not null,
    model            text not null,
    usage            jsonb not null default '{}',
    cost_usd         numeric(14, 8) not null default 0,
    created_at       timestamptz not null default now()
);
create index if not exists openai_call_request on dynamo.openai_call (image_request_id);
create index if not exists openai_call_created on dynamo.openai_call (created_at);
-- Issue 18: a call's row is written with the step write that follows the call, and a
-- write whose COMMIT answer was lost is tried again as it is: the id dynamo gives the
-- call when its answer comes makes the second try add nothing (rows from before: null).
alter table dynamo.openai_call add column if not exists call_id uuid;
create unique index if not exists openai_call_call_id on dynamo.openai_call (call_id);
-- The fleet: what each process has in hand, and where its HTTP API is, for GET /status.
alter table dynamo.worker
    add column if not exists in_hand integer not null default 0,
    add column if not exists http_addr text;

-- The OpenAI account's budget, shared by every dynamo process (dynamo.database.fleet_store): each
-- permit granted in the last minutes (times are the database clock's epoch seconds), and
-- per kind of call what was learned from the API (limits, pauses, the auth circuit).
create table if not exists dynamo.permit_grant (
    id         uuid primary key,
    kind       text not null,
    worker_id  uuid,
    granted_at double precision not null,
    tokens     integer not null default 0,
    is_call    boolean not null default true
);
create index if not exists permit_grant_kind_time on dynamo.permit_grant (kind, granted_at);
create index if not exists permit_grant_time on dynamo.permit_grant (granted_at);

create table if not exists dynamo.rate_limit_state (
    kind       text primary key,
    state      jsonb not null,
    updated_at timestamptz not null default now()
);

-- Every request load and list page looks up its friend's name by request id.
create index if not exists answer_image_request_id on dynamo.answer (image_request_id);
-- The live page's change feed (dynamo/database/changes.py): every new request and every change
-- of a request's step or state is announced on channel dynamo_request_changes when its
-- transaction commits, whichever process wrote it. The payload is small (< 300 bytes).
create or replace function dynamo.notify_request_change() returns trigger
language plpgsql as $$
begin
    if tg_op = 'INSERT' or new.step is distinct from old.step
            or new.state is distinct from old.state then
        perform pg_notify('dynamo_request_changes', json_build_object(
            'id', new.id, 'viewer', new.twitch_user_id,
            'step', new.step, 'state', new.state)::text);
    end if;
    return null;
end
$$;
drop trigger if exists image_request_notify on dynamo.image_request;
create trigger image_request_notify
    after insert or update of step, state on dynamo.image_request
    for each row execute function dynamo.notify_request_change();

-- When the current reservation of points began, and a flow id belongs to one request
-- only: a request found at `reserving` after a crash adopts the debit the ledger made
-- for it since then, never one another request holds (`Database.adopt_flow`).
alter table dynamo.image_request add column if not exists reserving_since timestamptz;
create unique index if not exists image_request_flow_id_unique
    on dynamo.image_request (flow_id);

-- Issue 17, the broadcaster's safety net. A screened image may wait for the broadcaster
-- at step `awaiting_approval` until `approval_deadline` (its raw bytes stay in
-- dynamo.generated_image, never in public storage); the decision, whoever took it, is
-- `approval_decision` (approved, rejected, timeout). `image_flagged`: the moderation
-- endpoint flagged the generated image.
alter table dynamo.image_request
    add column if not exists approval_deadline timestamptz,
    add column if not exists approval_decision text,
    add column if not exists approval_decided_at timestamptz,
    add column if not exists image_flagged boolean not null default false;
create index if not exists image_request_awaiting_approval
    on dynamo.image_request (approval_deadline) where step = 'awaiting_approval';
