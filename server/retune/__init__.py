"""The closed loop: keeps each group on the most accurate configuration meeting its target."""
