-- Open reservations move into the account row: one page written per reservation, not two.
-- `holds` is JSON {"<pid>.<start>:<minute bucket>:<worker>": [count, cost, last_reserved_at]}:
-- the open reservations of one process and worker made in one bucket of time. Closing one takes
-- its cost off its slot; a slot whose newest reservation is older than reservation_ttl_s (a
-- crashed holder) is dropped, as token_reservations rows expired before. in_flight = sum(cost).
ALTER TABLE token_accounts ADD COLUMN holds TEXT NOT NULL DEFAULT '{}';

-- Reservations open at upgrade time keep counting until they expire, one slot each.
UPDATE token_accounts SET
    holds = coalesce((SELECT json_group_object('0.0:' || r.id || ':' || r.worker,
                                               json_array(1, r.cost, r.created_at))
                      FROM token_reservations r WHERE r.account = token_accounts.account), '{}'),
    in_flight = coalesce((SELECT sum(r.cost) FROM token_reservations r
                          WHERE r.account = token_accounts.account), 0);

DROP TABLE token_reservations;
