"""Processes the gateway starts and keeps alive: the bundled Triton and gateway workers."""
