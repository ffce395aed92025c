-- Views for operators: the questions `ingest status` / `ingest diagnose` answer, in plain SQL.
-- See docs/diagnostics.md for example queries. Times are Unix seconds; ages are measured from
-- the wall clock at query time ("now" below). Hours are UTC, 'YYYY-MM-DD HH:00'.
-- These views only read: they change nothing and cost nothing to keep.

-- Each lease, judged by the wall clock: 'held' | 'expired' | 'free'. (A dead holder on this host
-- still shows 'held' until its TTL passes: `ingest leases` also checks the process itself.)
CREATE VIEW lease_health AS
WITH t(now) AS (SELECT (julianday('now') - 2440587.5) * 86400.0)
SELECT
    l.name,
    CASE WHEN l.holder_nonce IS NULL THEN 'free'
         WHEN t.now - l.renewed_at > l.ttl_s THEN 'expired'
         ELSE 'held' END                                   AS state,
    l.holder_host || ':' || l.holder_pid                   AS holder,
    l.fence,
    CASE WHEN l.holder_nonce IS NOT NULL THEN round(t.now - l.acquired_at, 1) END AS held_for_s,
    CASE WHEN l.holder_nonce IS NOT NULL THEN round(t.now - l.renewed_at, 1) END  AS heartbeat_age_s,
    l.ttl_s,
    l.renewals,
    l.transitions,
    (SELECT count(*) FROM lease_events e
      WHERE e.name = l.name AND e.at >= t.now - 3600
        AND e.event IN ('acquired', 'taken_over_expired', 'taken_over_dead')) AS acquisitions_last_hour,
    (SELECT e.event FROM lease_events e WHERE e.name = l.name ORDER BY e.id DESC LIMIT 1) AS last_event
FROM leases l, t;

-- Keepa calls per hour and worker: what was estimated, what was charged, 429s, errors, latency.
CREATE VIEW token_flow_hourly AS
SELECT
    strftime('%Y-%m-%d %H:00', at, 'unixepoch')            AS hour,
    worker,
    count(*)                                               AS calls,
    sum(asins)                                             AS asins,
    round(sum(estimated), 1)                               AS tokens_estimated,
    coalesce(sum(actual), 0)                               AS tokens_spent,
    sum(status = 'rate_limited')                           AS rate_limited,
    sum(status NOT IN ('ok', 'rate_limited'))              AS errors,
    round(avg(latency_ms))                                 AS avg_latency_ms,
    min(tokens_left)                                       AS min_tokens_left,
    max(tokens_left)                                       AS max_tokens_left
FROM keepa_calls
GROUP BY hour, worker;

-- Rejections and incomplete outcomes per hour, by reason. 'incomplete' (data missing: refetched
-- later) is never a rejection: keep the two apart when reading rates.
CREATE VIEW rejections_hourly AS
SELECT
    strftime('%Y-%m-%d %H:00', at, 'unixepoch')            AS hour,
    outcome,
    reason,
    count(*)                                               AS decisions,
    count(DISTINCT asin)                                   AS asins
FROM decisions
WHERE outcome IN ('rejected', 'incomplete')
GROUP BY hour, outcome, reason;

-- The funnel per hour: every evaluation outcome, and the acceptance rate among complete ones.
CREATE VIEW funnel AS
SELECT
    strftime('%Y-%m-%d %H:00', at, 'unixepoch')            AS hour,
    count(DISTINCT CASE WHEN outcome != 'removed' THEN asin END) AS evaluated,
    sum(outcome = 'accepted')                              AS accepted,
    sum(outcome = 'rejected')                              AS rejected,
    sum(outcome = 'incomplete')                            AS incomplete,
    sum(outcome = 'removed')                               AS removed,
    round(100.0 * sum(outcome = 'accepted')
          / nullif(sum(outcome IN ('accepted', 'rejected')), 0), 1) AS accepted_pct,
    round(100.0 * sum(outcome = 'incomplete')
          / nullif(sum(outcome != 'removed'), 0), 1)       AS incomplete_pct
FROM decisions
GROUP BY hour;

-- How fresh the stored deals are, per status: fetched (product data) and seen (listed) ages.
CREATE VIEW deal_freshness AS
WITH t(now) AS (SELECT (julianday('now') - 2440587.5) * 86400.0)
SELECT
    d.status,
    count(*)                                               AS deals,
    sum(d.last_fetched >= t.now - 3600)                    AS fetched_last_hour,
    sum(d.last_fetched >= t.now - 86400)                   AS fetched_last_day,
    sum(d.last_fetched IS NULL)                            AS never_fetched,
    round((t.now - min(d.last_fetched)) / 3600.0, 1)       AS oldest_fetch_h,
    round(avg(t.now - d.last_fetched) / 3600.0, 1)         AS avg_fetch_age_h,
    round((t.now - max(d.last_seen)) / 60.0, 1)            AS newest_seen_min,
    sum(d.last_seen < t.now - 86400)                       AS unseen_over_day,
    sum(d.status = 'incomplete' AND d.next_retry_at <= t.now) AS retry_due
FROM deals d, t
GROUP BY d.status;

-- Each worker's progress row with ages, and its Keepa calls and commits of the last hour.
CREATE VIEW worker_activity AS
WITH t(now) AS (SELECT (julianday('now') - 2440587.5) * 86400.0)
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
    (SELECT coalesce(sum(c.actual), 0) FROM keepa_calls c
      WHERE c.worker = p.worker AND c.at >= t.now - 3600)  AS tokens_last_hour,
    (SELECT count(*) FROM keepa_calls c
      WHERE c.worker = p.worker AND c.at >= t.now - 3600 AND c.status = 'rate_limited') AS rate_limited_last_hour
FROM worker_progress p, t;

-- The backfill cursor and the upsert watermark, unpacked from their JSON checkpoints.
CREATE VIEW checkpoint_progress AS
WITH t(now) AS (SELECT (julianday('now') - 2440587.5) * 86400.0)
SELECT
    c.name,
    round(t.now - c.updated_at)                            AS updated_age_s,
    c.fence,
    json_extract(c.value, '$.pass')                        AS pass,
    json_extract(c.value, '$.page')                        AS page,
    coalesce(json_array_length(c.value, '$.pending'), 0)   AS pending,
    round(json_extract(c.value, '$.next_pass_at') - t.now) AS next_pass_in_s,
    json_extract(c.value, '$.watermark')                   AS watermark_keepa_minute,
    -- Keepa minutes are minutes since 2011-01-01: unix = (minute + 21564000) * 60
    round(t.now - (json_extract(c.value, '$.watermark') + 21564000) * 60) AS watermark_lag_s,
    round(json_extract(c.value, '$.next_poll_at') - t.now) AS next_poll_in_s
FROM checkpoints c, t;
