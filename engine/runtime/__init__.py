"""The embedded runtime: a real PostgreSQL and a real Kafka-protocol broker on loopback."""
