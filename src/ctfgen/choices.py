"""The names the command line offers as choices, free of torch so that `ctfgen --help` answers without it; the
modules behind them say what each name means (`checkpoint.DTYPES`, `backends.precision`, `clustering`)."""

WEIGHT_DTYPES = ("fp32", "fp16", "bf16")  # what weights are stored in, or cast to
PRECISIONS = ("auto", "bf16", "fp32")  # of the computation: auto is bf16 autocast where the hardware runs it fast
CLUSTER_METHODS = ("kmeans", "random")  # k-means over the codebook, or a random partition (the control)
