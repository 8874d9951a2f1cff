"""The sync gateway: devices' sync endpoint and the admin endpoint (FastAPI)."""
