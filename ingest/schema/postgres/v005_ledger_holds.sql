-- Open reservations move into the account row: the port of ../v005_ledger_holds.sql.
ALTER TABLE token_accounts ADD COLUMN holds TEXT NOT NULL DEFAULT '{}';

UPDATE token_accounts SET
    holds = coalesce((SELECT json_object_agg('0.0:' || r.id || ':' || r.worker,
                                             json_build_array(1, r.cost, r.created_at))::text
                      FROM token_reservations r WHERE r.account = token_accounts.account), '{}'),
    in_flight = coalesce((SELECT sum(r.cost) FROM token_reservations r
                          WHERE r.account = token_accounts.account), 0);

DROP TABLE token_reservations;
