-- 001_init: images and index metadata. Source of truth of a blipsearch index.
-- feat is the L2-normalized image feature (embed_dim little-endian float32).
-- has_tokens = 1 once the row's record in tokens.bin was written and synced.
CREATE TABLE images (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  path        TEXT NOT NULL UNIQUE,
  size        INTEGER NOT NULL,
  mtime_ns    INTEGER NOT NULL,
  fingerprint INTEGER NOT NULL,
  width       INTEGER,
  height      INTEGER,
  orientation INTEGER,
  taken_at    TEXT,
  state       TEXT NOT NULL CHECK (state IN ('ok', 'error')),
  error       TEXT,
  feat        BLOB,
  has_tokens  INTEGER NOT NULL DEFAULT 0,
  indexed_at  INTEGER NOT NULL
);
CREATE INDEX images_fingerprint ON images(fingerprint);
CREATE INDEX images_size ON images(size);
CREATE TABLE meta (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
