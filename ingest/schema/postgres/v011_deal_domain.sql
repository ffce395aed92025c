-- Which Keepa marketplace a deal came from: the port of ../v011_deal_domain.sql.
ALTER TABLE deals ADD COLUMN domain BIGINT;
