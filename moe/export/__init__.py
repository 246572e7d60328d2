"""Export: Hugging Face models, per-expert files, pruning and upcycling."""
