"""The Evaluator's metrics (tfma_metrics.py) and their batched evaluation inside TFMA's (batched.py)."""
