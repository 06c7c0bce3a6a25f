"""Measurements of retro_toolkit, run as scripts from the repository root.

speed/      timings and memory, every ratio measured side by side in one run
probes/     research measurements: what retrieval gives a small Retro, and why
gpu_check.py  the one-shot check of the GPU-only paths, then GPU throughput
common.py   what the scripts share; results/ holds the recorded JSON, each with its command
"""
