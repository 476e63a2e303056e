"""Evaluation: pairwise win rates (raw and length-controlled), bootstrap intervals, 1-10 grading."""
