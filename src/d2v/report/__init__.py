"""What a person reads after a run: the summary table (``d2v summary``)."""
