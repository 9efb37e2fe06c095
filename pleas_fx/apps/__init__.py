"""Applications on top of the library: the pleas-fx command (merge, inspect, demo) and the
checkpoint, model and dataset loaders it uses."""
