"""The framework-free core: where a missing gradient is detected, explained and counted."""
