-- Which Keepa marketplace (domain: 1 .com, 2 .co.uk, 3 .de ...) a deal's listing and product came
-- from: a worker's /deal query and /product calls always ask the same one ([keepa] domain; a
-- query naming another domainId is refused at start). NULL: stored before v011 (the .com default
-- then, unless [keepa] domain said otherwise).
ALTER TABLE deals ADD COLUMN domain INTEGER;
