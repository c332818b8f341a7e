"""Batch scoring on Ray Data: `run` (the job), `inputs` (what is read), `parts` (resumable output)."""
