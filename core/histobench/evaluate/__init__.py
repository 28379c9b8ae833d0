"""Evaluation protocols, aggregator training, metrics and statistics."""
