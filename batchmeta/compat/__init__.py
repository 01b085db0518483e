"""Drop-in replacements for other engines' metadata helpers."""
