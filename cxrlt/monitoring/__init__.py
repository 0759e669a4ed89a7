"""What happens to a served model: `store` (the prediction store the service records each scored study in;
SQLite by default, PostgreSQL for many replicas), `log` (the record's one shape, and the JSONL log of earlier
versions that `log_import` brings into the store once), `reference` (the validation images' statistics that
evaluation writes), `drift` (Evidently reports of the stored studies against the validation split; every
Evidently call lives there) and `history` (the runs of drift reports over time)."""
