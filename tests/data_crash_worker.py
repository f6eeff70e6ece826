"""A stand-in for a decoder that kills its process (imported by the spawned workers of
test_data_real.py's crash test; not a test module)."""
import os


def crash_on_boom(task):
    if task.clip == "boom":
        os._exit(3)  # what a segfault in FFmpeg looks like to the pool
    return task.clip, None
