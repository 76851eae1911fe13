"""Vision-language-action driving policy (Alpamayo-R1 in miniature)."""
