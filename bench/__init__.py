"""Benchmarks: each module runs freezeps as a user would and writes what it measured."""
import sys

# How a bench starts freezeps; what follows it in a command is freezeps's own command line.
FREEZEPS = [sys.executable, "-m", "freezeps"]
