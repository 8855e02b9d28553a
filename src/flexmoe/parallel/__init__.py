"""Running the layer across ranks: collectives, cross-rank agreement, pipelined exchange, one strategy
object per plan, and the data-parallel wrapper for the rest of a model."""
