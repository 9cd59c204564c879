"""freezeps: a freeze-aware parameter server for communication-light data-parallel fine-tuning.

This package sits above `ps/` and `worker/`: the configuration, the command line, the
launcher that starts a PS and its workers, and the reports that read their logs.
"""
__version__ = "0.1.0"
