"""Modal screens: confirmation, pool picker, pin dialog, the Tiers forms, help."""
