"""Projection of change topics into per-organisation staging tables with per-entity watermarks."""
