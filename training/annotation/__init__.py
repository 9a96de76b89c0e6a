"""Pair annotation by a VLM: stage-1 labelling, the SFT export, the stage-2 fine-tune, pair mining, and its CLI."""
