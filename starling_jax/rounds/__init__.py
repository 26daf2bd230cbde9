"""On-policy preference data in rounds (`python -m starling_jax.onpolicy`): sample → label → train_dpo / train_rm →
the next round. `config.py` (the run config), `chain.py` (the stages, their outputs and restarts), `heldout.py`
(the held-out reward of a round's policy)."""
