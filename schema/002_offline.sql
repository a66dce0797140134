-- 002_offline: change detection that keeps what it cannot see.
-- retry = 1: the image failed for a reason that may pass (unreadable, vanished,
--   I/O error, time-out): the next scan tries it again whatever its size and mtime.
-- offline = 1: the file could not be looked at (unreadable folder, missing root,
--   unmounted drive): the row keeps its feature but leaves the search set until
--   a scan sees the file again.
-- mounts: the device of each indexed root and of each mount point found under
--   one, so that an unmounted drive's empty mount point is not taken for deletions.
ALTER TABLE images ADD COLUMN retry INTEGER NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN offline INTEGER NOT NULL DEFAULT 0;
-- the few failed and offline rows, found without reading every row (and its feature)
CREATE INDEX images_failed ON images(id) WHERE state = 'error';
CREATE INDEX images_offline ON images(id) WHERE offline = 1;
CREATE TABLE mounts (
  path TEXT PRIMARY KEY,
  dev  INTEGER NOT NULL
);
