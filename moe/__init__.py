"""moe: train dense and mixture-of-experts GPT models side by side."""

__version__ = "0.1.0"
