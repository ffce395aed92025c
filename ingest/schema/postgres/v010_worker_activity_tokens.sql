-- worker_activity.tokens_spent from the call log's running totals (v008): the port of
-- ../v010_worker_activity_tokens.sql (spelling as in v004_views.sql).
DROP VIEW worker_activity;

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
    p.pages, p.deals_seen, p.accepted, p.rejected, p.incomplete, p.removed,
    (SELECT coalesce(sum(k.tokens), 0)::bigint FROM keepa_call_totals k WHERE k.worker = p.worker) AS tokens_spent,
    p.errors,
    p.last_error,
    round(t.now - p.last_error_at)                         AS last_error_age_s,
    (SELECT count(*) FROM keepa_calls c WHERE c.worker = p.worker AND c.at >= t.now - 3600) AS calls_last_hour,
    (SELECT coalesce(sum(c.actual), 0)::bigint FROM keepa_calls c
      WHERE c.worker = p.worker AND c.at >= t.now - 3600)  AS tokens_last_hour,
    (SELECT count(*) FROM keepa_calls c
      WHERE c.worker = p.worker AND c.at >= t.now - 3600 AND c.status = 'rate_limited') AS rate_limited_last_hour
FROM worker_progress p, t;
