"""Tools on top of the library and the worker: the ``defect-assist`` CLI, the stack, a local Label Studio."""
