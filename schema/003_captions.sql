-- 003_captions: one generated caption per image (blip-index --captions), searchable with FTS5.
-- caption is NULL until the image is captioned; a changed file gets a new row, so it is captioned again.
-- captions_fts indexes images.caption (external content), kept in step by the triggers.
ALTER TABLE images ADD COLUMN caption TEXT;
CREATE VIRTUAL TABLE captions_fts USING fts5(caption, content='images', content_rowid='id',
                                             tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER images_caption_ad AFTER DELETE ON images WHEN old.caption IS NOT NULL BEGIN
  INSERT INTO captions_fts(captions_fts, rowid, caption) VALUES ('delete', old.id, old.caption);
END;
CREATE TRIGGER images_caption_au AFTER UPDATE OF caption ON images BEGIN
  INSERT INTO captions_fts(captions_fts, rowid, caption) SELECT 'delete', old.id, old.caption WHERE old.caption IS NOT NULL;
  INSERT INTO captions_fts(rowid, caption) SELECT new.id, new.caption WHERE new.caption IS NOT NULL;
END;
