-- Views for operators on PostgreSQL: the port of ../v004_views.sql (same views, same columns, the
-- same answers). What differs is spelling only:
--   now             unix_now() (below) for SQLite's (julianday('now') - 2440587.5) * 86400.0:
--                   the wall clock at query time (clock_timestamp, not the transaction's start)
--   hour            to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00') for
--                   strftime('%Y-%m-%d %H:00', at, 'unixepoch')
--   sum(cond)       sum((cond)::int): SQLite sums booleans as 0/1 (NULL stays NULL in both)
--   round(x, 1)     round(x::numeric, 1)::double precision (PostgreSQL rounds numerics to digits)
--   json_extract    (value::jsonb ->> 'key') cast to the number it holds
--   sum(bigint)     cast back to bigint (PostgreSQL sums bigints as numeric)

-- The wall clock as unix seconds, for the views and the pruning rules (v009, v012).
CREATE FUNCTION unix_now() RETURNS double precision LANGUAGE sql VOLATILE AS $$
    SELECT extract(epoch FROM clock_timestamp())::double precision
$$;

-- Each lease, judged by the wall clock: 'held' | 'expired' | 'free'.
CREATE VIEW lease_health AS
WITH t(now) AS (SELECT unix_now())
SELECT
    l.name,
    CASE WHEN l.holder_nonce IS NULL THEN 'free'
         WHEN t.now - l.renewed_at > l.ttl_s THEN 'expired'
         ELSE 'held' END                                   AS state,
    l.holder_host || ':' || l.holder_pid                   AS holder,
    l.fence,
    CASE WHEN l.holder_nonce IS NOT NULL THEN round((t.now - l.acquired_at)::numeric, 1)::double precision END AS held_for_s,
    CASE WHEN l.holder_nonce IS NOT NULL THEN round((t.now - l.renewed_at)::numeric, 1)::double precision END  AS heartbeat_age_s,
    l.ttl_s,
    l.renewals,
    l.transitions,
    (SELECT count(*) FROM lease_events e
      WHERE e.name = l.name AND e.at >= t.now - 3600
        AND e.event IN ('acquired', 'taken_over_expired', 'taken_over_dead')) AS acquisitions_last_hour,
    (SELECT e.event FROM lease_events e WHERE e.name = l.name ORDER BY e.id DESC LIMIT 1) AS last_event
FROM leases l, t;

-- Keepa calls per hour and worker.
CREATE VIEW token_flow_hourly AS
SELECT
    to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00') AS hour,
    worker,
    count(*)                                               AS calls,
    sum(asins)::bigint                                     AS asins,
    round(sum(estimated)::numeric, 1)::double precision    AS tokens_estimated,
    coalesce(sum(actual), 0)::bigint                       AS tokens_spent,
    sum((status = 'rate_limited')::int)                    AS rate_limited,
    sum((status NOT IN ('ok', 'rate_limited'))::int)       AS errors,
    round(avg(latency_ms))                                 AS avg_latency_ms,
    min(tokens_left)                                       AS min_tokens_left,
    max(tokens_left)                                       AS max_tokens_left
FROM keepa_calls
GROUP BY 1, worker;

-- Rejections and incomplete outcomes per hour, by reason.
CREATE VIEW rejections_hourly AS
SELECT
    to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00') AS hour,
    outcome,
    reason,
    count(*)                                               AS decisions,
    count(DISTINCT asin)                                   AS asins
FROM decisions
WHERE outcome IN ('rejected', 'incomplete')
GROUP BY 1, outcome, reason;

-- The funnel per hour.
CREATE VIEW funnel AS
SELECT
    to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00') AS hour,
    count(DISTINCT CASE WHEN outcome != 'removed' THEN asin END) AS evaluated,
    sum((outcome = 'accepted')::int)                       AS accepted,
    sum((outcome = 'rejected')::int)                       AS rejected,
    sum((outcome = 'incomplete')::int)                     AS incomplete,
    sum((outcome = 'removed')::int)                        AS removed,
    round(100.0 * sum((outcome = 'accepted')::int)
          / nullif(sum((outcome IN ('accepted', 'rejected'))::int), 0), 1)::double precision AS accepted_pct,
    round(100.0 * sum((outcome = 'incomplete')::int)
          / nullif(sum((outcome != 'removed')::int), 0), 1)::double precision AS incomplete_pct
FROM decisions
GROUP BY 1;

-- How fresh the stored deals are, per status.
CREATE VIEW deal_freshness AS
WITH t(now) AS (SELECT unix_now())
SELECT
    d.status,
    count(*)                                               AS deals,
    sum((d.last_fetched >= t.now - 3600)::int)             AS fetched_last_hour,
    sum((d.last_fetched >= t.now - 86400)::int)            AS fetched_last_day,
    sum((d.last_fetched IS NULL)::int)                     AS never_fetched,
    round(((t.now - min(d.last_fetched)) / 3600.0)::numeric, 1)::double precision AS oldest_fetch_h,
    round((avg(t.now - d.last_fetched) / 3600.0)::numeric, 1)::double precision   AS avg_fetch_age_h,
    round(((t.now - max(d.last_seen)) / 60.0)::numeric, 1)::double precision      AS newest_seen_min,
    sum((d.last_seen < t.now - 86400)::int)                AS unseen_over_day,
    sum((d.status = 'incomplete' AND d.next_retry_at <= t.now)::int) AS retry_due
FROM deals d, t
GROUP BY d.status, t.now;

-- Each worker's progress row with ages, and its Keepa calls and commits of the last hour.
CREATE VIEW worker_activity AS
WITH t(now) AS (SELECT unix_now())
SELECT
    p.worker,
    p.state,
    p.pid,
    p.fence,
    round(t.now - p.updated_at)                            AS updated_age_s,
    round(t.now - p.last_commit_at)                        AS last_commit_age_s,
    round(t.now - p.last_success_at)                       AS last_success_age_s,
    p.pages, p.deals_seen, p.accepted, p.rejected, p.incomplete, p.removed, p.tokens_spent, p.errors,
    p.last_error,
    round(t.now - p.last_error_at)                         AS last_error_age_s,
    (SELECT count(*) FROM keepa_calls c WHERE c.worker = p.worker AND c.at >= t.now - 3600) AS calls_last_hour,
    (SELECT coalesce(sum(c.actual), 0)::bigint FROM keepa_calls c
      WHERE c.worker = p.worker AND c.at >= t.now - 3600)  AS tokens_last_hour,
    (SELECT count(*) FROM keepa_calls c
      WHERE c.worker = p.worker AND c.at >= t.now - 3600 AND c.status = 'rate_limited') AS rate_limited_last_hour
FROM worker_progress p, t;

-- The backfill cursor and the upsert watermark, unpacked from their JSON checkpoints.
CREATE VIEW checkpoint_progress AS
WITH t(now) AS (SELECT unix_now())
SELECT
    c.name,
    round(t.now - c.updated_at)                            AS updated_age_s,
    c.fence,
    (c.value::jsonb ->> 'pass')::bigint                    AS pass,
    (c.value::jsonb ->> 'page')::bigint                    AS page,
    coalesce(CASE WHEN jsonb_typeof(c.value::jsonb -> 'pending') = 'array'
                  THEN jsonb_array_length(c.value::jsonb -> 'pending') END, 0) AS pending,
    round((c.value::jsonb ->> 'next_pass_at')::double precision - t.now) AS next_pass_in_s,
    (c.value::jsonb ->> 'watermark')::bigint               AS watermark_keepa_minute,
    -- Keepa minutes are minutes since 2011-01-01: unix = (minute + 21564000) * 60
    round(t.now - ((c.value::jsonb ->> 'watermark')::double precision + 21564000) * 60) AS watermark_lag_s,
    round((c.value::jsonb ->> 'next_poll_at')::double precision - t.now) AS next_poll_in_s
FROM checkpoints c, t;
