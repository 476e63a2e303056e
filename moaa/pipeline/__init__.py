"""The MoAA pipeline: prompts in, MoA SFT data, preference pairs, trained models and an eval report out."""
