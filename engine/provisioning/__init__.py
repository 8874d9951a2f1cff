"""Provisioning: org lifecycle as commands on fieldsync.provisioning, applied by workers."""
