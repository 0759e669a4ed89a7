"""What happens to a served model: `log` (the prediction log the service appends to), `reference` (the
validation images' statistics that evaluation writes), `drift` (Evidently reports of the log against the
validation split; every Evidently call lives there) and `history` (the runs of drift reports over time)."""
