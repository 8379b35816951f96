"""Tools that drive the run: the command line, the progress display, the benchmark and the
default-corpus builder. They are not part of a stack's counted code."""
