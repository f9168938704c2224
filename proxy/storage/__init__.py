"""The one database connection, its schemas and its batched writer."""
