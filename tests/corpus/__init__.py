"""Candidate programs that the pipeline must reject, and benign controls that it must accept."""
