"""The one pretraining loop used by every pretext."""
