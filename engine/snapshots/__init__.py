"""Compacted snapshots of staging entities (Avro container files behind a snapshot store)."""
