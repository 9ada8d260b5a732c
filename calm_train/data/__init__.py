"""Reading prepared MDS shards: verification, loader, collation."""
