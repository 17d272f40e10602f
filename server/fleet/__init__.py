"""The coordinator's fleet side: registry, telemetry ingestion, store, HTTP API, simulator."""
