"""Built-in techniques: one file per technique, each registering itself with
``@register("<file name>")``. The registry imports every module of this package on first use."""
