"""What changes the meaning of a gradient: precision (loss scaling), the strategy, several ranks."""
