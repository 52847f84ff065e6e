"""The evolution core: archive, prompts, proposers and the loop."""
