"""A call's lifecycle: admission permits and the call scope that both fronts use."""
