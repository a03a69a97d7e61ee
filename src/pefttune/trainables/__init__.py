"""Ray Tune function trainables: discrete placement and DARTS."""
