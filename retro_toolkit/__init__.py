"""retro_toolkit: Retro and InstructRetro end to end, driven by YAML recipes."""

__version__ = "0.1.0"
