-- 005_token_segments: rerank records kept in other files. A merged index
-- (blip-index merge) links each shard's tokens.bin here instead of copying
-- it: image id in [first_id, last_id] has its record in file (relative to
-- the index directory) under the shard's own id, id - id_offset.
CREATE TABLE token_segments (
  first_id  INTEGER PRIMARY KEY,
  last_id   INTEGER NOT NULL,
  id_offset INTEGER NOT NULL,
  file      TEXT NOT NULL
);
