-- Finding users by the start of their username (the console's search, GET /api/v1/user/?username_prefix=):
-- byte order (COLLATE "C") lets a LIKE 'prefix%' be a range scan of this index, in the order the
-- results are paged, whatever the database's collation.
CREATE INDEX users_by_username_c ON users (username COLLATE "C");
