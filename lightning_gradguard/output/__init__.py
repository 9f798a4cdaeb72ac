"""What leaves the guard: the logging cadence, the metrics, and the sinks that write them."""
