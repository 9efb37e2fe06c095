"""The core layer: the IR every pass shares (layouts, groups, plans, weight nodes), typed freeze
reasons, errors, input binding and generated inputs, small torch.fx helpers. Imports nothing
of pleas_fx above it."""
