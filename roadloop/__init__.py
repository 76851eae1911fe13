"""roadloop: closed-loop post-training of autonomous-driving policies."""

__version__ = "0.1.0"
