"""Change capture: logical decoding of a source PostgreSQL into Debezium-shaped Avro change topics.

Vocabulary after Debezium: a *snapshot source* reads existing rows (op ``r``), a *streaming
source* decodes the WAL (pgoutput), *schemas* describe keys and envelopes, a *framing* puts
schema references on the wire, and the *capture task* ties one organisation's source to its
topics and advances the replication slot only behind the broker's acknowledgements.
"""
