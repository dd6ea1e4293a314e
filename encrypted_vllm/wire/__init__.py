"""The wire both sides share: `protocol` says what a job's request and each
streamed item say in plaintext; `channel` seals them as Fernet tokens and
admits them. Neither imports anything of the client or the worker."""
