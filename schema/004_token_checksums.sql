-- 004_token_checksums: a checksum for each token record, so that garbage in
-- tokens.bin is told from data.
-- tok_sum is the XXH3-64 of the row's record (tag + payload) as written; NULL
-- for records written before this version, until the writer has read them once.
-- has_tokens = 2: the record was found missing or damaged; queries recompute
-- the tokens from the file, and the next blip-index run rewrites the record.
ALTER TABLE images ADD COLUMN tok_sum INTEGER;
