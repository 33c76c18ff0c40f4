"""clipkd: CLIP prompt tuning with knowledge distillation for base-to-new generalisation.

The package root imports nothing heavy so that ``clipkd --help`` and the data commands answer fast;
torch and open_clip are imported by the modules that need them.
"""

__version__ = "0.1.0"
