"""Hospital agent: ingestion, validation, DP fine-tuning of heads, privacy ledger, audit log, Flower ClientApp."""
