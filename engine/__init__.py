"""FieldSync engine: change capture (`streams`), staging projection (`projections`) and
snapshots."""

__version__ = "0.1.0"
