"""The model registry on the BentoML model store: `store` (register, stages, serving mark, promotion,
rollback; bentoml imported lazily), `history` (each model's record and its name's serving history) and
`model_card` (the card written at registration)."""
