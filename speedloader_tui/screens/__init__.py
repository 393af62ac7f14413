"""Modal screens: confirmation, pool picker, prompts, pin dialog, help."""
